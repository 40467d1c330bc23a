//! Building a [`LlamaModel`] from a GGUF file.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::file::GgufFile;
use super::layout::{self, OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBD, block_tensor};
use super::metadata;
use crate::engine::LlamaConfig;
use crate::engine::error::{EngineError, Result};
use crate::engine::linear::{Embedding, Linear};
use crate::engine::model::{Attention, DecoderLayer, LlamaModel, Mlp, auto_kv_dtype};
use crate::engine::placement::{Footprint, Placement};
use crate::engine::rope::Rope;

impl LlamaModel {
    /// Loads a Llama model from a llama.cpp GGUF file: the configuration from its `llama.*`
    /// metadata, Llama 3 rope scaling from its `rope_freqs.weight` tensor, and the weights,
    /// computing in `dtype` on `device`. Block-quantized matrices stay quantized; float ones are
    /// converted to `dtype`. The tokenizer is not read from the file (the server takes
    /// `tokenizer.json` from the same directory).
    pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_gguf_on(path, dtype, std::slice::from_ref(device), |_| 0)
    }

    /// [`Self::load_gguf`] with the layers split over `devices` ([`Placement::split`]),
    /// balancing their weights and their keys and values at the budget `kv_tokens` gives for
    /// the model's configuration.
    pub fn load_gguf_on(
        path: &Path,
        dtype: DType,
        devices: &[Device],
        kv_tokens: impl FnOnce(&LlamaConfig) -> usize,
    ) -> Result<Self> {
        Self::load_gguf_file(GgufFile::open(path)?, dtype, devices, kv_tokens)
    }

    /// [`Self::load_gguf_on`] on a file whose header is already read.
    pub fn load_gguf_file(
        file: GgufFile,
        dtype: DType,
        devices: &[Device],
        kv_tokens: impl FnOnce(&LlamaConfig) -> usize,
    ) -> Result<Self> {
        Self::load_gguf_with(file, dtype, |config, footprint| {
            Placement::split(devices, config, footprint, kv_tokens(config))
        })
    }

    /// [`Self::load_gguf_file`] with the placement `place` chooses for the configuration and
    /// memory footprint.
    pub(crate) fn load_gguf_with(
        mut file: GgufFile,
        dtype: DType,
        place: impl FnOnce(&LlamaConfig, Footprint) -> Result<Placement>,
    ) -> Result<Self> {
        let _span = tracing::info_span!("load_gguf", path = %file.path().display()).entered();
        let config = metadata::llama_config(&file)?;
        let placement = place(&config, footprint(&file, &config, dtype))?;
        let device = placement.first();
        let rope = match frequency_factors(&mut file, config.head_dim())? {
            Some(factors) => Rope::with_frequency_factors(&config, &factors, device)?,
            None => Rope::new(&config, device)?,
        };
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.kv_heads();
        let head_dim = config.head_dim();
        let inter = config.intermediate_size;

        let mut reader = Reader {
            file: &mut file,
            dtype,
            device,
        };
        let embedding = reader.qtensor(TOKEN_EMBD, &[config.vocab_size, hidden])?;
        let embedding_dtype = embedding.dtype();
        let embed_tokens = Embedding::from_qtensor(embedding, dtype)?;
        // Not sized by the configuration: a missing layer's tensors end the loop with an error.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            reader.device = placement.layer_device(i);
            let name = |part: &str| block_tensor(i, part);
            layers.push(DecoderLayer {
                input_layernorm: reader.vector(&name("attn_norm"), hidden)?,
                self_attn: Attention {
                    q_proj: reader.rotary(&name("attn_q"), heads, head_dim, hidden)?,
                    k_proj: reader.rotary(&name("attn_k"), kv_heads, head_dim, hidden)?,
                    v_proj: reader.linear(&name("attn_v"), kv_heads * head_dim, hidden)?,
                    o_proj: reader.linear(&name("attn_output"), hidden, heads * head_dim)?,
                },
                post_attention_layernorm: reader.vector(&name("ffn_norm"), hidden)?,
                mlp: Mlp {
                    gate_proj: reader.linear(&name("ffn_gate"), inter, hidden)?,
                    up_proj: reader.linear(&name("ffn_up"), inter, hidden)?,
                    down_proj: reader.linear(&name("ffn_down"), hidden, inter)?,
                },
            });
        }
        reader.device = device;
        let norm = reader.vector(OUTPUT_NORM, hidden)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.tied_output()
        } else {
            reader.linear(OUTPUT, config.vocab_size, hidden)?
        };
        tracing::info!(
            layers = config.num_hidden_layers,
            hidden,
            vocab = config.vocab_size,
            tied = config.tie_word_embeddings,
            "GGUF model loaded"
        );
        let kv_dtype = auto_kv_dtype(dtype, embedding_dtype != GgmlDType::F32);
        Ok(Self::assemble(
            config,
            (dtype, kv_dtype),
            placement,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        ))
    }
}

/// The memory of the file's weights as the engine keeps them (block-quantized ones packed,
/// others in the compute dtype, a little over for 1-D float ones) and of their default cache.
fn footprint(file: &GgufFile, config: &LlamaConfig, dtype: DType) -> Footprint {
    let (mut bytes, mut parameters) = (0f64, 0f64);
    for name in file.tensor_names() {
        let (Ok(shape), Ok(stored)) = (file.shape(name), file.dtype(name)) else {
            continue;
        };
        // In floating point: a damaged header's shape may overflow any integer product (the
        // tensor itself is refused when it is read).
        let count: f64 = shape.iter().map(|&d| d as f64).product();
        let per = if matches!(stored, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            dtype.size_in_bytes() as f64
        } else {
            stored.type_size() as f64 / stored.block_size() as f64
        };
        bytes += count * per;
        parameters += count;
    }
    let per_parameter = if parameters > 0.0 {
        bytes / parameters
    } else {
        dtype.size_in_bytes() as f64
    };
    let quantized_embedding = file
        .dtype(TOKEN_EMBD)
        .is_ok_and(|stored| stored != GgmlDType::F32);
    Footprint::new(
        config,
        per_parameter,
        auto_kv_dtype(dtype, quantized_embedding),
    )
}

/// Reads tensors of one file into the engine's types.
struct Reader<'a> {
    file: &'a mut GgufFile,
    dtype: DType,
    device: &'a Device,
}

impl Reader<'_> {
    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<Arc<QTensor>> {
        Ok(Arc::new(self.file.read(name, shape, self.device)?))
    }

    /// A 1-D weight (RMSNorm), expanded to the compute dtype.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let q = self.file.read(name, &[len], self.device)?;
        Ok(q.dequantize(self.device)?.to_dtype(self.dtype)?)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Linear::from_qtensor(self.qtensor(name, &[out, inp])?, self.dtype)
    }

    /// `attn_q` / `attn_k`, with the Hugging Face row order restored (see [`layout`]).
    fn rotary(&mut self, name: &str, heads: usize, head_dim: usize, inp: usize) -> Result<Linear> {
        let stored = self
            .file
            .read(name, &[heads * head_dim, inp], &Device::Cpu)?;
        let restored = layout::to_hf_rows(&stored, heads, self.device)?;
        Linear::from_qtensor(Arc::new(restored), self.dtype)
    }
}

/// The divisors llama.cpp applies to the rotary frequencies: the `rope_freqs.weight` tensor
/// (Llama 3 scaling) times a `linear` scaling factor, or `None` when the file has neither.
fn frequency_factors(file: &mut GgufFile, head_dim: usize) -> Result<Option<Vec<f32>>> {
    let linear = metadata::linear_rope_factor(file)?;
    let tensor = if file.contains(ROPE_FREQS) {
        let factors = file.read(ROPE_FREQS, &[head_dim / 2], &Device::Cpu)?;
        let factors: Vec<f32> = factors.dequantize(&Device::Cpu)?.to_vec1()?;
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(EngineError::InvalidGguf {
                path: file.path().to_owned(),
                reason: format!("tensor `{ROPE_FREQS}` holds {bad}, not a positive factor"),
            });
        }
        Some(factors)
    } else {
        None
    };
    Ok(match (tensor, linear) {
        (None, None) => None,
        (Some(factors), None) => Some(factors),
        (None, Some(linear)) => Some(vec![linear; head_dim / 2]),
        (Some(factors), Some(linear)) => Some(factors.into_iter().map(|f| f * linear).collect()),
    })
}
