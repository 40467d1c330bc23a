//! The Llama 3.x transformer: grouped-query attention, RMSNorm, SwiGLU, RoPE with Llama 3
//! scaling, tied or untied embeddings.
//!
//! One forward call runs a batch of sequences. Their new tokens are packed into one row
//! dimension for the position-independent work (projections, MLP); attention then runs per
//! sequence against that sequence's own [`KvCache`], at that sequence's own positions.
//!
//! Weights come from a Hugging Face safetensors directory ([`LlamaModel::load`]) or a llama.cpp
//! GGUF file ([`LlamaModel::load_gguf`], in `gguf/load.rs`); both end in the same structure.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::error::{EngineError, Result};
use super::kv_cache::KvCache;
use super::linear::{Embedding, Linear};
use super::rope::Rope;
use super::weights::WeightFiles;

/// Which rows of logits a sequence wants back from a forward step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new token (decoding).
    Last,
    /// Every new token (scoring a prompt, tests).
    All,
}

/// One sequence's part of a batched forward step.
#[derive(Debug)]
pub struct SequenceStep<'a> {
    /// Tokens to append to the sequence (the whole prompt at first, then one per step).
    pub tokens: &'a [u32],
    /// The sequence's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut KvCache,
    pub logits: LogitsFor,
}

/// The projections of one attention block, in the Hugging Face row layout.
pub(super) struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
}

/// The SwiGLU feed-forward block.
pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
}

/// One transformer block: RMSNorm weights in the compute dtype, attention, MLP.
pub(super) struct DecoderLayer {
    pub(super) input_layernorm: Tensor,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: Tensor,
    pub(super) mlp: Mlp,
}

/// A loaded Llama model, ready to run on its device.
pub struct LlamaModel {
    pub(super) config: LlamaConfig,
    pub(super) dtype: DType,
    pub(super) device: Device,
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: Tensor,
    pub(super) lm_head: Linear,
    pub(super) rope: Rope,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl LlamaModel {
    /// Loads `config.json` and the safetensors weights (single or sharded) of a Hugging Face
    /// model directory, memory-mapped, converted to `dtype` on `device`. A path to a file rather
    /// than a directory is read as GGUF ([`LlamaModel::load_gguf`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return Self::load_gguf(dir, dtype, device);
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFiles::open(dir)?;
        Self::from_weights(config, &weights, dtype, device)
    }

    /// Builds the model from an already validated configuration and opened weights.
    pub fn from_weights(
        config: LlamaConfig,
        weights: &WeightFiles,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_out = config.num_attention_heads * head_dim;
        let kv_out = config.kv_heads() * head_dim;
        let inter = config.intermediate_size;
        let load = |name: &str, shape: &[usize]| weights.load(name, shape, dtype, device);
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::dense(load(name, &[out, inp])?))
        };

        let embed_tokens = Embedding::Dense(load(
            "model.embed_tokens.weight",
            &[config.vocab_size, hidden],
        )?);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: load(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj.weight"), q_out, hidden)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj.weight"), kv_out, hidden)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj.weight"), kv_out, hidden)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj.weight"), hidden, q_out)?,
                },
                post_attention_layernorm: load(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[hidden],
                )?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj.weight"), inter, hidden)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj.weight"), inter, hidden)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj.weight"), hidden, inter)?,
                },
            });
        }
        let norm = load("model.norm.weight", &[hidden])?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.tied_output()
        } else {
            linear("lm_head.weight", config.vocab_size, hidden)?
        };
        let rope = Rope::new(&config, device)?;
        Ok(Self {
            config,
            dtype,
            device: device.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The rotary embedding, with any rope scaling applied to its frequencies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype computations run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The context window in tokens.
    pub fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// A fresh, empty cache for one sequence of this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// A fresh cache for a sequence that will hold at most `tokens` tokens.
    pub fn new_cache_with_limit(&self, tokens: usize) -> KvCache {
        KvCache::with_limit(self.config.num_hidden_layers, tokens)
    }

    /// Runs one step for a batch of sequences and appends their tokens to their caches.
    ///
    /// Returns, per sequence in order, f32 logits of shape `[rows, vocab_size]` where `rows` is 1
    /// for [`LogitsFor::Last`] and the number of new tokens for [`LogitsFor::All`]. Nothing is
    /// appended to any cache when the inputs are rejected.
    pub fn forward(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_batch(batch)?;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for step in batch.iter() {
            ids.extend_from_slice(step.tokens);
            let start = step.cache.len();
            positions.extend((start..start + step.tokens.len()).map(|p| p as u32));
        }
        let total = ids.len();
        let _span =
            tracing::debug_span!("forward", sequences = batch.len(), tokens = total).entered();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed_tokens.lookup(&ids, self.dtype)?;
        let (cos, sin) = self.rope.cos_sin(&positions, self.dtype)?;
        let eps = self.config.rms_norm_eps as f32;

        for (index, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let attn = self.attention(index, &layer.self_attn, &h, &cos, &sin, batch)?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let mlp = &layer.mlp;
            let gated =
                (candle_nn::ops::silu(&mlp.gate_proj.forward(&h)?)? * mlp.up_proj.forward(&h)?)?;
            x = (x + mlp.down_proj.forward(&gated)?)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;

        // The rows whose logits are wanted go through the output projection together: it is
        // the largest matrix (a fifth of a 1B model), so one pass over it serves the whole batch.
        let mut wanted = Vec::with_capacity(batch.len());
        let mut counts = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for step in batch.iter() {
            let len = step.tokens.len();
            let rows = match step.logits {
                LogitsFor::Last => offset + len - 1..offset + len,
                LogitsFor::All => offset..offset + len,
            };
            counts.push(rows.len());
            wanted.extend(rows.map(|row| row as u32));
            offset += len;
        }
        let rows = if wanted.len() == total {
            x
        } else {
            let count = wanted.len();
            x.index_select(&Tensor::from_vec(wanted, count, &self.device)?, 0)?
        };
        let all = self.lm_head.forward(&rows)?.to_dtype(DType::F32)?;
        let mut logits = Vec::with_capacity(batch.len());
        let mut start = 0;
        for count in counts {
            logits.push(all.narrow(0, start, count)?);
            start += count;
        }
        Ok(logits)
    }

    /// Bytes the weights occupy in memory (quantized blocks at their packed size; a tied
    /// output projection counted once, with the embedding table).
    pub fn weight_bytes(&self) -> u64 {
        let dense = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|layer| {
                let attn = &layer.self_attn;
                let mlp = &layer.mlp;
                dense(&layer.input_layernorm)
                    + dense(&layer.post_attention_layernorm)
                    + [
                        &attn.q_proj,
                        &attn.k_proj,
                        &attn.v_proj,
                        &attn.o_proj,
                        &mlp.gate_proj,
                        &mlp.up_proj,
                        &mlp.down_proj,
                    ]
                    .iter()
                    .map(|linear| linear.bytes())
                    .sum::<u64>()
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.bytes()
        };
        self.embed_tokens.bytes() + layers + dense(&self.norm) + head
    }

    /// Bytes one token occupies in a sequence's key/value cache: keys and values of every
    /// layer, in the compute dtype.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.config.num_hidden_layers
            * self.config.kv_heads()
            * self.config.head_dim()
            * self.dtype.size_in_bytes()) as u64
    }

    /// Rejects a batch before any cache is touched.
    fn check_batch(&self, batch: &[SequenceStep<'_>]) -> Result<()> {
        if batch.is_empty() {
            return Err(EngineError::InvalidInput("empty batch".into()));
        }
        for (index, step) in batch.iter().enumerate() {
            if step.tokens.is_empty() {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {index} has no tokens"
                )));
            }
            if step.cache.num_layers() != self.layers.len() {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {index} has a cache for {} layers, the model has {}",
                    step.cache.num_layers(),
                    self.layers.len()
                )));
            }
            if let Some(&bad) = step
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(EngineError::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary of {} tokens",
                    self.config.vocab_size
                )));
            }
            let needed = step.cache.len() + step.tokens.len();
            if needed > self.context_length() {
                return Err(EngineError::PromptTooLong {
                    tokens: needed,
                    context: self.context_length(),
                });
            }
        }
        Ok(())
    }

    /// Self-attention of layer `index` for the packed rows `h` (`[tokens, hidden]`).
    fn attention(
        &self,
        index: usize,
        attn: &Attention,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &mut [SequenceStep<'_>],
    ) -> Result<Tensor> {
        let total = h.dim(0)?;
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.kv_heads();
        let head_dim = self.config.head_dim();
        let q = attn.q_proj.forward(h)?.reshape((total, heads, head_dim))?;
        let k = attn
            .k_proj
            .forward(h)?
            .reshape((total, kv_heads, head_dim))?;
        let v = attn
            .v_proj
            .forward(h)?
            .reshape((total, kv_heads, head_dim))?;
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?;

        let mut outputs = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for step in batch.iter_mut() {
            let len = step.tokens.len();
            let past = step.cache.len();
            let q = q.narrow(0, offset, len)?.transpose(0, 1)?.contiguous()?;
            let k = k.narrow(0, offset, len)?.transpose(0, 1)?.contiguous()?;
            let v = v.narrow(0, offset, len)?.transpose(0, 1)?.contiguous()?;
            let (k, v) = step.cache.append(index, &k, &v)?;
            outputs.push(self.attend(&q, &k, &v, past)?);
            offset += len;
        }
        let out = Tensor::cat(&outputs, 0)?;
        attn.o_proj.forward(&out)
    }

    /// Causal grouped-query attention of one sequence: `q` is `[heads, new, head_dim]`, `k` and
    /// `v` are `[kv_heads, past + new, head_dim]`. Returns `[new, heads * head_dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
        let (heads, new, head_dim) = q.dims3()?;
        let kv_heads = k.dim(0)?;
        let total = k.dim(1)?;
        let group = heads / kv_heads;
        // Query heads h = kv * group + r share key/value head kv (Hugging Face's repeat_kv).
        let q = q.reshape((kv_heads, group * new, head_dim))?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = if new > 1 {
            let mask: Vec<f32> = (0..new)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (new, total), &self.device)?;
            scores
                .reshape((kv_heads, group, new, total))?
                .broadcast_add(&mask)?
                .reshape((kv_heads, group * new, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(v)?; // [kv_heads, group * new, head_dim]
        Ok(out
            .reshape((heads, new, head_dim))?
            .transpose(0, 1)?
            .reshape((new, heads * head_dim))?)
    }
}
