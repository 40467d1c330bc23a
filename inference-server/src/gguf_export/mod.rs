//! Converting a Hugging Face Llama directory into a llama.cpp-style GGUF file: what
//! `convert_hf_to_gguf.py` (and `llama-quantize` for Q4_K_M) would write, so that llama.cpp and
//! this engine can run the very same file.
//!
//! - Metadata: `general.*`, the `llama.*` hyperparameters, and the tokenizer
//!   ([`tokenizer_metadata`]).
//! - Tensors under llama.cpp's names, `attn_q`/`attn_k` rows permuted for its rotary layout
//!   ([`crate::engine::gguf::layout`]), Llama 3 rope scaling as `rope_freqs.weight`.
//! - Storage types per tensor as llama.cpp chooses them ([`tensor_types`]).
//!
//! candle's writer takes every tensor at once, so the whole converted model is held in memory
//! while the file is written (about the size of the file).

mod tensor_types;
mod tokenizer_metadata;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};

use crate::engine::config::{LlamaConfig, RopeScaling};
use crate::engine::error::{EngineError, Result};
use crate::engine::gguf::layout::{self, BLOCK_PARTS, OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBD};
use crate::engine::rope::inverse_frequencies;
use crate::engine::weights::WeightFiles;

pub use tensor_types::{TensorRole, tensor_type};
pub use tokenizer_metadata::tokenizer_metadata;

/// The GGUF file types `generate-model --gguf` writes (llama.cpp's `general.file_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum GgufFileType {
    /// Matrices in F16, norms in F32 (`convert_hf_to_gguf.py --outtype f16`).
    #[value(name = "f16")]
    F16,
    /// Matrices in Q8_0 (`--outtype q8_0`).
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output and some `attn_v`/`ffn_down`.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl GgufFileType {
    /// The lower-case name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
        }
    }

    /// `model-<type>.gguf`.
    pub fn file_name(self) -> String {
        format!("model-{}.gguf", self.name())
    }

    /// llama.cpp's `llama_ftype` number.
    fn llama_ftype(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }
}

/// Writes the model of the Hugging Face directory `model_dir` (`config.json`, safetensors,
/// `tokenizer.json`, `tokenizer_config.json`) to the GGUF file `out`, replacing it. The file
/// appears under its name only once complete.
pub fn export_gguf(model_dir: &Path, file_type: GgufFileType, out: &Path) -> Result<()> {
    let _span = tracing::info_span!("export_gguf", out = %out.display()).entered();
    let config = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let weights = WeightFiles::open(model_dir)?;
    let mut metadata = model_metadata(&config, file_type, model_dir);
    let eos = config
        .eos_token_id
        .as_ref()
        .and_then(|ids| ids.to_vec().first().copied());
    metadata.extend(tokenizer_metadata(model_dir, config.vocab_size, eos)?);
    let tensors = convert_tensors(&config, &weights, file_type)?;

    let partial = out.with_extension("gguf.partial");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EngineError::Io { path, source }
    };
    let mut writer = BufWriter::new(File::create(&partial).map_err(io(&partial))?);
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut writer, &metadata_refs, &tensor_refs).map_err(|err| {
        EngineError::InvalidInput(format!("cannot write {}: {err}", partial.display()))
    })?;
    writer.flush().map_err(io(&partial))?;
    drop(writer);
    std::fs::rename(&partial, out).map_err(io(out))
}

/// `general.*` and `llama.*`, with the value types llama.cpp's writer uses (u32, f32).
fn model_metadata(
    config: &LlamaConfig,
    file_type: GgufFileType,
    model_dir: &Path,
) -> Vec<(String, Value)> {
    let count = |n: usize| Value::U32(n as u32);
    let name = model_dir
        .file_name()
        .map_or_else(|| "llama".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String(name)),
        ("general.file_type", Value::U32(file_type.llama_ftype())),
        ("general.quantization_version", Value::U32(2)),
        ("llama.vocab_size", count(config.vocab_size)),
        (
            "llama.context_length",
            count(config.max_position_embeddings),
        ),
        ("llama.embedding_length", count(config.hidden_size)),
        ("llama.block_count", count(config.num_hidden_layers)),
        ("llama.feed_forward_length", count(config.intermediate_size)),
        ("llama.rope.dimension_count", count(config.head_dim())),
        (
            "llama.attention.head_count",
            count(config.num_attention_heads),
        ),
        ("llama.attention.head_count_kv", count(config.kv_heads())),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(config.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
    ];
    if config.head_dim() != config.hidden_size / config.num_attention_heads {
        metadata.push(("llama.attention.key_length", count(config.head_dim())));
        metadata.push(("llama.attention.value_length", count(config.head_dim())));
    }
    metadata
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// Every tensor under its llama.cpp name, converted and stored in its type.
fn convert_tensors(
    config: &LlamaConfig,
    weights: &WeightFiles,
    file_type: GgufFileType,
) -> Result<Vec<(String, QTensor)>> {
    let device = Device::Cpu;
    let hidden = config.hidden_size;
    let head_dim = config.head_dim();
    let layers = config.num_hidden_layers;
    let mut tensors = Vec::new();
    let mut add = |name: String, weight: Tensor, role: TensorRole| -> Result<()> {
        let row_len = weight.dims().last().copied().unwrap_or(0);
        let dtype = tensor_type(file_type, role, row_len);
        let stored = QTensor::quantize(&weight, dtype).map_err(|err| {
            EngineError::InvalidInput(format!("cannot store `{name}` as {dtype:?}: {err}"))
        })?;
        tensors.push((name, stored));
        Ok(())
    };
    let load = |name: &str, shape: &[usize]| weights.load(name, shape, DType::F32, &device);

    if let Some(scaling) = &config.rope_scaling {
        let factors = rope_factors(config, scaling);
        let len = factors.len();
        add(
            ROPE_FREQS.to_owned(),
            Tensor::from_vec(factors, len, &device)?,
            TensorRole::Vector,
        )?;
    }
    add(
        TOKEN_EMBD.to_owned(),
        load("model.embed_tokens.weight", &[config.vocab_size, hidden])?,
        TensorRole::TokenEmbedding {
            tied: config.tie_word_embeddings,
        },
    )?;
    let q_rows = config.num_attention_heads * head_dim;
    let kv_rows = config.kv_heads() * head_dim;
    for layer in 0..layers {
        for (hf, gguf) in BLOCK_PARTS {
            let shape = match gguf {
                "attn_norm" | "ffn_norm" => vec![hidden],
                "attn_q" => vec![q_rows, hidden],
                "attn_k" | "attn_v" => vec![kv_rows, hidden],
                "attn_output" => vec![hidden, q_rows],
                "ffn_gate" | "ffn_up" => vec![config.intermediate_size, hidden],
                _ => vec![hidden, config.intermediate_size],
            };
            let weight = load(&format!("model.layers.{layer}.{hf}.weight"), &shape)?;
            let (weight, role) = match gguf {
                "attn_norm" | "ffn_norm" => (weight, TensorRole::Vector),
                "attn_q" => (
                    layout::to_gguf_rows(&weight, config.num_attention_heads)?,
                    TensorRole::Matrix,
                ),
                "attn_k" => (
                    layout::to_gguf_rows(&weight, config.kv_heads())?,
                    TensorRole::Matrix,
                ),
                "attn_v" => (weight, TensorRole::AttentionValue { layer, layers }),
                "ffn_down" => (weight, TensorRole::FeedForwardDown { layer, layers }),
                _ => (weight, TensorRole::Matrix),
            };
            add(layout::block_tensor(layer, gguf), weight, role)?;
        }
    }
    add(
        OUTPUT_NORM.to_owned(),
        load("model.norm.weight", &[hidden])?,
        TensorRole::Vector,
    )?;
    if !config.tie_word_embeddings {
        add(
            OUTPUT.to_owned(),
            load("lm_head.weight", &[config.vocab_size, hidden])?,
            TensorRole::Output,
        )?;
    }
    Ok(tensors)
}

/// The converter's `rope_freqs`: for each frequency, the divisor Llama 3 scaling applies
/// (1 for short wavelengths, `factor` for long ones, a blend between), computed in f32.
fn rope_factors(config: &LlamaConfig, scaling: &RopeScaling) -> Vec<f32> {
    let plain = LlamaConfig {
        rope_scaling: None,
        ..config.clone()
    };
    let factor = scaling.factor as f32;
    let low = scaling.low_freq_factor as f32;
    let high = scaling.high_freq_factor as f32;
    let old_context = scaling.original_max_position_embeddings as f32;
    inverse_frequencies(&plain)
        .into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < old_context / high {
                1.0
            } else if wavelen > old_context / low {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate_model::ModelShape;

    #[test]
    fn rope_factors_reproduce_the_scaled_frequencies() {
        let config = ModelShape::TinyUntied.config();
        let scaling = config.rope_scaling.clone().expect("scaled");
        let factors = rope_factors(&config, &scaling);
        let plain = inverse_frequencies(&LlamaConfig {
            rope_scaling: None,
            ..config.clone()
        });
        let scaled = inverse_frequencies(&config);
        assert_eq!(factors.len(), config.head_dim() / 2);
        assert_eq!(factors[0], 1.0);
        assert_eq!(factors.last().copied(), Some(8.0));
        for ((p, s), f) in plain.iter().zip(&scaled).zip(&factors) {
            assert!((p / f - s).abs() <= s * 1e-6, "{p} / {f} vs {s}");
        }
    }

    #[test]
    fn file_type_names() {
        assert_eq!(GgufFileType::Q4KM.file_name(), "model-q4_k_m.gguf");
        assert_eq!(GgufFileType::Q8_0.llama_ftype(), 7);
    }
}
