//! The Llama 3.x transformer: grouped-query attention, RMSNorm, SwiGLU, RoPE with Llama 3
//! scaling, tied or untied embeddings.
//!
//! One forward call runs a batch of sequences. Their new tokens are packed into one row
//! dimension for the position-independent work (projections, MLP). Every sequence's cache is a
//! run of rows in the model's [`KvPool`], so each layer writes the new keys and values of the
//! whole batch at once. Attention then runs at each sequence's own positions: per sequence, on
//! a view of its rows, for prompt chunks. The sequences that decode one token attend together:
//! on a GPU they are gathered into one padded, masked batch, so a step launches the same
//! kernels for 64 sequences as for one; on the CPU one fused pass reads each sequence's rows in
//! place, its (sequence, key/value head) pairs spread over the engine's threads
//! (`cpu_attention.rs`).
//!
//! Weights come from a Hugging Face safetensors directory ([`LlamaModel::load`]) or a llama.cpp
//! GGUF file ([`LlamaModel::load_gguf`], in `gguf/load.rs`); both end in the same structure.
//!
//! A model too large for one GPU has its decoder layers split over several
//! ([`LlamaModel::load_on`], `placement.rs`): a step runs each device's layers with that
//! device's copy of the attention plan and rotary tables, handing the hidden state from device
//! to device, and ends on the first one, which holds the embedding and the output projection.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::cpu_argmax::argmax_rows;
use super::cpu_attention::{self, DecodeRow};
use super::cpu_pool;
use super::cpu_prefill_attention::{self, PrefillRows};
use super::cpu_swiglu::swiglu;
use super::error::{EngineError, Result};
use super::gguf::GgufFile;
use super::kv_cache::KvCache;
use super::kv_pool::KvPool;
use super::linear::{Embedding, Linear};
use super::placement::{Footprint, Placement, hand_over};
use super::rope::Rope;
use super::weights::WeightFiles;

/// Which rows of logits a sequence wants back from a forward step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new token (decoding).
    Last,
    /// Every new token (scoring a prompt, tests).
    All,
    /// Only the most likely next token (greedy decoding with no penalties or log-probabilities
    /// wanted): the argmax of the last row is taken on the device and returned as a `[1, 1]`
    /// u32 tensor, so a step copies one id to the host instead of a vocabulary-sized row.
    Argmax,
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

impl DecoderLayer {
    /// The block's seven weight matrices.
    fn linears(&self) -> [&Linear; 7] {
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        [
            &attn.q_proj,
            &attn.k_proj,
            &attn.v_proj,
            &attn.o_proj,
            &mlp.gate_proj,
            &mlp.up_proj,
            &mlp.down_proj,
        ]
    }
}

/// A loaded Llama model, ready to run on its device.
pub struct LlamaModel {
    pub(super) config: LlamaConfig,
    pub(super) dtype: DType,
    /// The device of the embedding, the final norm and the output projection (the first of
    /// [`Self::placement`]).
    pub(super) device: Device,
    /// Where each decoder layer, and its keys and values, lives.
    pub(super) placement: Placement,
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: Tensor,
    pub(super) lm_head: Linear,
    pub(super) rope: Rope,
    /// The key/value rows every cache of this model takes its run from.
    pub(super) kv_pool: Arc<KvPool>,
    /// Whether decoding sequences attend as one padded batch (see the module docs).
    pub(super) batched_decode: bool,
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
        Self::load_on(dir, dtype, std::slice::from_ref(device), |_| 0)
    }

    /// [`Self::load`] with the layers split over `devices` ([`Placement::split`]), balancing
    /// their weights and their keys and values at the key/value budget `kv_tokens` gives for
    /// the model's configuration.
    pub fn load_on(
        dir: &Path,
        dtype: DType,
        devices: &[Device],
        kv_tokens: impl FnOnce(&LlamaConfig) -> usize,
    ) -> Result<Self> {
        Self::load_with(dir, dtype, |config, footprint| {
            Placement::split(devices, config, footprint, kv_tokens(config))
        })
    }

    /// [`Self::load`] with the layers where `placement` puts them (it must place exactly the
    /// model's layers).
    pub fn load_placed(dir: &Path, dtype: DType, placement: Placement) -> Result<Self> {
        Self::load_with(dir, dtype, |config, _| placement.for_model(config))
    }

    /// [`Self::load`] with the placement `place` chooses for the model's configuration and
    /// memory footprint.
    fn load_with(
        dir: &Path,
        dtype: DType,
        place: impl FnOnce(&LlamaConfig, Footprint) -> Result<Placement>,
    ) -> Result<Self> {
        if dir.is_file() {
            return Self::load_gguf_with(GgufFile::open(dir)?, dtype, place);
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFiles::open(dir)?;
        config.validate()?;
        let footprint = dense_footprint(&config, &weights, dtype);
        let placement = place(&config, footprint)?;
        Self::from_weights_placed(config, &weights, dtype, placement)
    }

    /// Builds the model from a configuration and opened weights, its layers split over
    /// `devices` ([`Placement::split`]; one device holds everything).
    pub fn from_weights(
        config: LlamaConfig,
        weights: &WeightFiles,
        dtype: DType,
        devices: &[Device],
    ) -> Result<Self> {
        config.validate()?;
        let footprint = dense_footprint(&config, weights, dtype);
        let placement = Placement::split(devices, &config, footprint, 0)?;
        Self::from_weights_placed(config, weights, dtype, placement)
    }

    /// [`Self::from_weights`] on a validated configuration, with its placement.
    fn from_weights_placed(
        config: LlamaConfig,
        weights: &WeightFiles,
        dtype: DType,
        placement: Placement,
    ) -> Result<Self> {
        let device = placement.first();
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_out = config.num_attention_heads * head_dim;
        let kv_out = config.kv_heads() * head_dim;
        let inter = config.intermediate_size;
        let load =
            |name: &str, shape: &[usize], device: &Device| weights.load(name, shape, dtype, device);
        let linear = |name: &str, out: usize, inp: usize, device: &Device| -> Result<Linear> {
            Ok(Linear::dense(load(name, &[out, inp], device)?))
        };

        let embed_tokens = Embedding::Dense(load(
            "model.embed_tokens.weight",
            &[config.vocab_size, hidden],
            device,
        )?);
        // Not sized by the configuration: a missing layer's tensors end the loop with an error.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let d = placement.layer_device(i);
            let linear = |name: &str, out: usize, inp: usize| {
                linear(&format!("{p}.{name}.weight"), out, inp, d)
            };
            layers.push(DecoderLayer {
                input_layernorm: load(&format!("{p}.input_layernorm.weight"), &[hidden], d)?,
                self_attn: Attention {
                    q_proj: linear("self_attn.q_proj", q_out, hidden)?,
                    k_proj: linear("self_attn.k_proj", kv_out, hidden)?,
                    v_proj: linear("self_attn.v_proj", kv_out, hidden)?,
                    o_proj: linear("self_attn.o_proj", hidden, q_out)?,
                },
                post_attention_layernorm: load(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[hidden],
                    d,
                )?,
                mlp: Mlp {
                    gate_proj: linear("mlp.gate_proj", inter, hidden)?,
                    up_proj: linear("mlp.up_proj", inter, hidden)?,
                    down_proj: linear("mlp.down_proj", hidden, inter)?,
                },
            });
        }
        let norm = load("model.norm.weight", &[hidden], device)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.tied_output()
        } else {
            linear("lm_head.weight", config.vocab_size, hidden, device)?
        };
        let rope = Rope::new(&config, device)?;
        let kv_dtype = dense_kv_dtype(weights, dtype);
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

    /// The model from its parts, computing in `dtypes.0`, with an empty key/value pool of
    /// `dtypes.1` on the layers' devices.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn assemble(
        config: LlamaConfig,
        (dtype, kv_dtype): (DType, DType),
        placement: Placement,
        embed_tokens: Embedding,
        layers: Vec<DecoderLayer>,
        norm: Tensor,
        lm_head: Linear,
        rope: Rope,
    ) -> Self {
        let kv_pool = empty_pool(&config, kv_dtype, &placement);
        let device = placement.first().clone();
        Self {
            config,
            dtype,
            batched_decode: !device.is_cpu(),
            device,
            placement,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            kv_pool,
        }
    }

    /// Chooses how decoding sequences attend: as one padded batch (`true`, the default on a
    /// GPU) or one by one on views of their rows (the default on the CPU). Both give the same
    /// results; tests run each on the CPU.
    pub fn set_batched_decode(&mut self, batched: bool) {
        self.batched_decode = batched;
    }

    /// Whether every matrix product runs on the engine's own CPU kernels, so that steps run on
    /// the engine's step thread ([`cpu_pool::on_step_thread`]) instead of rayon's global pool.
    pub fn on_engine_kernels(&self) -> bool {
        self.device.is_cpu()
            && self.lm_head.on_engine_kernels()
            && self
                .layers
                .iter()
                .all(|layer| layer.linears().iter().all(|l| l.on_engine_kernels()))
    }

    /// The element type of the key/value cache.
    pub fn kv_dtype(&self) -> DType {
        self.kv_pool.dtype()
    }

    /// Chooses the element type of the key/value cache (the loader chose one by
    /// [`auto_kv_dtype`]): f32, f16 or bf16. Only before any cache holds rows: the pool is
    /// replaced by an empty one of that type.
    pub fn set_kv_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(EngineError::InvalidInput(format!(
                "a key/value cache of {dtype:?} (f32, f16 or bf16)"
            )));
        }
        if self.kv_pool.rows() > 0 {
            return Err(EngineError::InvalidInput(
                "the key/value cache's dtype changes only before any cache holds rows".into(),
            ));
        }
        self.kv_pool = empty_pool(&self.config, dtype, &self.placement);
        Ok(())
    }

    /// The key/value pool the caches of this model take their rows from.
    pub fn kv_pool(&self) -> &Arc<KvPool> {
        &self.kv_pool
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The rotary embedding, with any rope scaling applied to its frequencies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The device of the embedding and the output projection: the one every weight lives on,
    /// unless the layers are split over several ([`Self::placement`]).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The devices of the model's layers.
    pub fn placement(&self) -> &Placement {
        &self.placement
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
        KvCache::new(self.kv_pool.clone())
    }

    /// A fresh cache for a sequence that will hold at most `tokens` tokens.
    pub fn new_cache_with_limit(&self, tokens: usize) -> KvCache {
        KvCache::with_limit(self.kv_pool.clone(), tokens)
    }

    /// Runs one step for a batch of sequences and appends their tokens to their caches.
    ///
    /// Returns, per sequence in order, f32 logits of shape `[rows, vocab_size]` where `rows` is 1
    /// for [`LogitsFor::Last`] and the number of new tokens for [`LogitsFor::All`] (or, for
    /// [`LogitsFor::Argmax`], the `[1, 1]` u32 id of the most likely token), on the CPU
    /// whatever the model's device. Nothing is appended to any cache when the inputs are
    /// rejected.
    pub fn forward(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Tensor>> {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            // On the CPU a step issues a few hundred parallel operations (every matrix
            // product, norm, rope and softmax). Issued from a thread outside the rayon pool,
            // each one is injected into the pool and waited for by sleeping on a lock, two
            // thread wake-ups per operation. Run from a worker, the step's own thread takes
            // part in every operation and waits by stealing work instead. Where the engine's
            // own kernels do every product, on its own pool, the step runs on a rayon pool of
            // one thread, so candle's small operations run inline and wake no one.
            if self.on_engine_kernels() {
                return cpu_pool::on_step_thread(|| self.forward_step(batch));
            }
            return rayon::scope(|_| self.forward_step(batch));
        }
        self.forward_step(batch)
    }

    /// [`LlamaModel::forward`] on the calling thread.
    fn forward_step(&self, batch: &mut [SequenceStep<'_>]) -> Result<Vec<Tensor>> {
        self.check_batch(batch)?;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        for step in batch.iter_mut() {
            ids.extend_from_slice(step.tokens);
            let start = step.cache.len();
            let new = step.tokens.len();
            positions.extend((start..start + new).map(|p| p as u32));
            // Room in the pool first: growing may move the sequence's rows.
            let first = step.cache.reserve(new)?;
            rows.extend((first..first + new).map(|r| r as u32));
        }
        let total = ids.len();
        let _span =
            tracing::debug_span!("forward", sequences = batch.len(), tokens = total).entered();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed_tokens.lookup(&ids, self.dtype)?;
        let (cos, sin) = self.rope.cos_sin(&positions, self.dtype)?;
        let eps = self.config.rms_norm_eps as f32;
        // Per device of the placement, the step's attention plan and rotary tables there,
        // made when its first layer comes.
        let mut on_device: Vec<Option<StepInputs>> =
            (0..self.placement.devices().len()).map(|_| None).collect();

        for (index, layer) in self.layers.iter().enumerate() {
            let at = self.placement.device_index(index);
            let device = self.placement.layer_device(index);
            x = hand_over(x, device)?;
            let inputs = match &mut on_device[at] {
                Some(inputs) => inputs,
                slot => slot.insert(StepInputs {
                    plan: AttentionPlan::new(self, batch, &rows, device)?,
                    cos: hand_over(cos.clone(), device)?,
                    sin: hand_over(sin.clone(), device)?,
                }),
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let attn = self.attention(
                index,
                &layer.self_attn,
                &h,
                (&inputs.cos, &inputs.sin),
                &inputs.plan,
            )?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let mlp = &layer.mlp;
            let [gate, up] = Linear::forward_each([&mlp.gate_proj, &mlp.up_proj], &h)?;
            let gated = swiglu(&gate, &up)?;
            x = (x + mlp.down_proj.forward(&gated)?)?;
        }
        for step in batch.iter_mut() {
            step.cache.advance(step.tokens.len())?;
        }
        let x = hand_over(x, &self.device)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;

        // The rows whose logits are wanted go through the output projection together: it is
        // the largest matrix (a fifth of a 1B model), so one pass over it serves the whole batch.
        let mut wanted = Vec::with_capacity(batch.len());
        let mut counts = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for step in batch.iter() {
            let len = step.tokens.len();
            let rows = match step.logits {
                LogitsFor::Last | LogitsFor::Argmax => offset + len - 1..offset + len,
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
        let to_host = |t: Tensor| -> Result<Tensor> {
            Ok(if t.device().is_cpu() {
                t
            } else {
                t.to_device(&Device::Cpu)?
            })
        };
        // Sampling runs on the host: one copy for the whole batch, not one per sequence, and
        // only ids for the sequences that just want the argmax.
        let argmax = if batch.iter().any(|s| s.logits == LogitsFor::Argmax) {
            Some(to_host(argmax_rows(&all)?)?)
        } else {
            None
        };
        let full = if batch.iter().any(|s| s.logits != LogitsFor::Argmax) {
            Some(to_host(all)?)
        } else {
            None
        };
        let mut logits = Vec::with_capacity(batch.len());
        let mut start = 0;
        for (step, count) in batch.iter().zip(counts) {
            let source = if step.logits == LogitsFor::Argmax {
                &argmax
            } else {
                &full
            };
            let Some(source) = source else {
                return Err(EngineError::InvalidInput(
                    "logits missing for a sequence".into(),
                ));
            };
            logits.push(source.narrow(0, start, count)?);
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
                dense(&layer.input_layernorm)
                    + dense(&layer.post_attention_layernorm)
                    + layer.linears().iter().map(|l| l.bytes()).sum::<u64>()
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
    /// layer, in the cache's dtype.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.config.num_hidden_layers
            * self.config.kv_heads()
            * self.config.head_dim()
            * self.kv_dtype().size_in_bytes()) as u64
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
            if !step.cache.uses(&self.kv_pool) {
                return Err(EngineError::InvalidInput(format!(
                    "sequence {index} has a cache made by another model (new_cache of this one)"
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

    /// Self-attention of layer `index` for the packed rows `h` (`[tokens, hidden]`): writes
    /// the new keys and values to the pool, then attends per sequence or as a decode batch.
    fn attention(
        &self,
        index: usize,
        attn: &Attention,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let total = h.dim(0)?;
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.kv_heads();
        let head_dim = self.config.head_dim();
        // Heads first: [heads, tokens, head_dim], the pool's layout for keys and values.
        let heads_first = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((total, n, head_dim))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let [q, k, v] = Linear::forward_each([&attn.q_proj, &attn.k_proj, &attn.v_proj], h)?;
        let q = Rope::apply(&heads_first(q, heads)?, cos, sin)?;
        let k = Rope::apply(&heads_first(k, kv_heads)?, cos, sin)?;
        let v = heads_first(v, kv_heads)?;
        let (keys, values) = self.kv_pool.layer(index)?;
        // The pool may hold a narrower type than the compute dtype (`auto_kv_dtype`).
        let (k, v) = (k.to_dtype(keys.dtype())?, v.to_dtype(values.dtype())?);
        match &plan.write {
            Write::Contiguous(row) => {
                keys.slice_set(&k, 1, *row)?;
                values.slice_set(&v, 1, *row)?;
            }
            Write::Scatter(rows) => {
                keys.scatter_set(rows, &k, 1)?;
                values.scatter_set(rows, &v, 1)?;
            }
        }

        let decoded = match &plan.decode {
            Some(decode) => Some(self.attend_decode_batch(&q, &keys, &values, decode)?),
            None => None,
        };
        let fused = if plan.fused.is_empty() {
            None
        } else {
            Some(cpu_attention::decode_attention(
                &q,
                &keys,
                &values,
                &plan.fused,
            )?)
        };
        if let Some(out) = &fused
            && plan.fused.len() == plan.sequences.len()
        {
            // Every sequence decodes: the fused rows are the packed rows, in order.
            return attn.o_proj.forward(out);
        }
        let mut outputs = Vec::with_capacity(plan.sequences.len());
        let mut offset = 0;
        for seq in &plan.sequences {
            match seq.decode_index {
                Some(i) => match &decoded {
                    Some(out) => outputs.push(out.narrow(0, i, 1)?),
                    None => {
                        return Err(EngineError::InvalidInput(
                            "decode batch missing from the attention plan".into(),
                        ));
                    }
                },
                None if seq.fused_index.is_some() => match (&fused, seq.fused_index) {
                    (Some(out), Some(i)) => outputs.push(out.narrow(0, i, 1)?),
                    _ => {
                        return Err(EngineError::InvalidInput(
                            "fused decode attention missing from the attention plan".into(),
                        ));
                    }
                },
                None if plan.cpu_prefill => {
                    outputs.push(cpu_prefill_attention::prefill_attention(
                        &q,
                        &keys,
                        &values,
                        PrefillRows {
                            token: offset,
                            start: seq.start,
                            past: seq.past,
                            new: seq.new,
                        },
                    )?);
                }
                None => {
                    let q = q.narrow(1, offset, seq.new)?;
                    let k = keys.narrow(1, seq.start, seq.past + seq.new)?;
                    let v = values.narrow(1, seq.start, seq.past + seq.new)?;
                    outputs.push(self.attend(&q, &k, &v, seq.past)?);
                }
            }
            offset += seq.new;
        }
        let out = match (&decoded, plan.all_decode_in_order, outputs.len()) {
            (Some(out), true, _) => out.clone(),
            (_, _, 1) => outputs.swap_remove(0),
            _ => Tensor::cat(&outputs, 0)?,
        };
        attn.o_proj.forward(&out)
    }

    /// Attention of the sequences that decode one token, as one batch (`q` is
    /// `[heads, tokens, head_dim]`, every packed token): their histories are gathered from the pool into `[kv_heads, batch, longest, head_dim]`, and positions past a
    /// sequence's length are masked out. Returns `[batch, heads * head_dim]` in the plan's
    /// order.
    fn attend_decode_batch(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        decode: &DecodeBatch,
    ) -> Result<Tensor> {
        let (heads, _, head_dim) = q.dims3()?;
        let kv_heads = keys.dim(0)?;
        let group = heads / kv_heads;
        let batch = decode.count;
        let longest = decode.longest;
        let q = match &decode.query_rows {
            Some(rows) => q.index_select(rows, 1)?,
            None => q.clone(),
        };
        // [heads, batch, d] → [kv_heads, batch, group, d]; head h = kv * group + r.
        let q = q
            .reshape((kv_heads, group, batch, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = keys
            .index_select(&decode.history_rows, 1)?
            .reshape((kv_heads, batch, longest, head_dim))?
            .to_dtype(self.dtype)?;
        let v = values
            .index_select(&decode.history_rows, 1)?
            .reshape((kv_heads, batch, longest, head_dim))?
            .to_dtype(self.dtype)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_add(&decode.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?; // [kv_heads, batch, group, head_dim]
        Ok(out
            .transpose(0, 1)?
            .contiguous()?
            .reshape((batch, heads * head_dim))?)
    }

    /// Causal grouped-query attention of one sequence: `q` is `[heads, new, head_dim]` (a view
    /// is fine), `k` and
    /// `v` are `[kv_heads, past + new, head_dim]`. Returns `[new, heads * head_dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
        let (heads, new, head_dim) = q.dims3()?;
        let kv_heads = k.dim(0)?;
        let total = k.dim(1)?;
        let group = heads / kv_heads;
        let (k, v) = (&k.to_dtype(self.dtype)?, &v.to_dtype(self.dtype)?);
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
            let mask = Tensor::from_vec(mask, (new, total), q.device())?;
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

/// The key/value cache's element type by default for safetensors weights ([`auto_kv_dtype`]).
fn dense_kv_dtype(weights: &WeightFiles, dtype: DType) -> DType {
    let stored = weights.stored_dtype("model.embed_tokens.weight");
    auto_kv_dtype(dtype, stored.is_some_and(|d| d.size_in_bytes() <= 2))
}

/// The memory of safetensors weights, converted to the compute dtype, and their cache.
fn dense_footprint(config: &LlamaConfig, weights: &WeightFiles, dtype: DType) -> Footprint {
    let kv_dtype = dense_kv_dtype(weights, dtype);
    Footprint::new(config, dtype.size_in_bytes() as f64, kv_dtype)
}

/// An empty key/value pool for a model of `config`, holding `dtype`, each layer's on that
/// layer's device.
fn empty_pool(config: &LlamaConfig, dtype: DType, placement: &Placement) -> Arc<KvPool> {
    Arc::new(KvPool::placed(
        placement.layer_devices(),
        config.kv_heads(),
        config.head_dim(),
        dtype,
    ))
}

/// The key/value cache's element type when none is chosen: f16 where the engine computes in
/// f32 but the weights were stored at 16 bits or fewer (bf16 or f16 safetensors, a quantized
/// GGUF file), as llama.cpp's and vLLM's caches are 16-bit for such models; otherwise the
/// compute dtype (f32 weights are kept exact end to end, which the reference checks rely on).
pub fn auto_kv_dtype(compute: DType, stored_16bit_or_less: bool) -> DType {
    if compute == DType::F32 && stored_16bit_or_less {
        DType::F16
    } else {
        compute
    }
}

/// What every layer of a step on one device shares: the attention plan and the rotary tables.
struct StepInputs {
    plan: AttentionPlan,
    cos: Tensor,
    sin: Tensor,
}

/// How one forward step's attention runs, worked out once per device and used by its layers.
struct AttentionPlan {
    sequences: Vec<SequencePlan>,
    write: Write,
    decode: Option<DecodeBatch>,
    /// On the CPU (f32), the sequences that decode one token outside a decode batch: they
    /// attend in one fused pass over their rows in place (`engine/cpu_attention.rs`).
    fused: Vec<DecodeRow>,
    /// Every sequence decodes one token, so the decode batch's rows are the packed rows.
    all_decode_in_order: bool,
    /// On the CPU (f32), sequences that feed several tokens attend through the fused causal
    /// kernel over their rows in place (`engine/cpu_prefill_attention.rs`).
    cpu_prefill: bool,
}

/// One sequence's place in the pool and in the step.
struct SequencePlan {
    /// Pool row of its first token.
    start: usize,
    /// Tokens cached before this step.
    past: usize,
    /// Tokens this step adds.
    new: usize,
    /// Its row in the decode batch, when it attends there.
    decode_index: Option<usize>,
    /// Its row in the CPU's fused decode attention ([`AttentionPlan::fused`]), when it
    /// attends there.
    fused_index: Option<usize>,
}

/// Where the step's new keys and values go in the pool.
enum Write {
    /// One run of rows from this one.
    Contiguous(usize),
    /// Row per token, as a `[kv_heads, tokens, head_dim]` index for `scatter_set` on dim 1.
    Scatter(Tensor),
}

/// The sequences that decode one token and attend together.
struct DecodeBatch {
    count: usize,
    /// The longest history among them (after this step).
    longest: usize,
    /// Their rows among the packed rows, unless they are all of them in order.
    query_rows: Option<Tensor>,
    /// Per sequence, the pool rows of its history padded to `longest` (`[count * longest]`).
    history_rows: Tensor,
    /// `[1, count, 1, longest]`: 0 where a sequence has a token, -inf on the padding.
    mask: Tensor,
}

impl AttentionPlan {
    /// `rows` holds the pool row of every packed token, in order; the plan's tensors are made
    /// on `device`.
    fn new(
        model: &LlamaModel,
        batch: &[SequenceStep<'_>],
        rows: &[u32],
        device: &Device,
    ) -> Result<Self> {
        let mut sequences = Vec::with_capacity(batch.len());
        let mut decoding = Vec::new();
        let mut offset = 0u32;
        for step in batch {
            let new = step.tokens.len();
            let decodes = model.batched_decode && new == 1;
            sequences.push(SequencePlan {
                start: step.cache.start(),
                past: step.cache.len(),
                new,
                decode_index: decodes.then_some(decoding.len()),
                fused_index: None,
            });
            if decodes {
                decoding.push(offset);
            }
            offset += new as u32;
        }
        // A lone decoding sequence reads its rows in place instead.
        if decoding.len() < 2 {
            for seq in &mut sequences {
                seq.decode_index = None;
            }
            decoding.clear();
        }
        let mut fused = Vec::new();
        if cpu_attention::supported(
            device,
            model.dtype,
            model.kv_dtype(),
            model.config.head_dim(),
        ) {
            let mut token = 0;
            for seq in &mut sequences {
                if seq.decode_index.is_none() && seq.new == 1 {
                    seq.fused_index = Some(fused.len());
                    fused.push(DecodeRow {
                        token,
                        start: seq.start,
                        len: seq.past + 1,
                    });
                }
                token += seq.new;
            }
        }
        let write = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
            Write::Contiguous(rows.first().map_or(0, |&r| r as usize))
        } else {
            let (kv_heads, head_dim) = (model.config.kv_heads(), model.config.head_dim());
            let mut index = Vec::with_capacity(kv_heads * rows.len() * head_dim);
            for _ in 0..kv_heads {
                for &row in rows {
                    index.extend(std::iter::repeat_n(row, head_dim));
                }
            }
            Write::Scatter(Tensor::from_vec(
                index,
                (kv_heads, rows.len(), head_dim),
                device,
            )?)
        };
        let all_decode_in_order = !decoding.is_empty() && decoding.len() == batch.len();
        let decode = if decoding.is_empty() {
            None
        } else {
            let members: Vec<&SequencePlan> = sequences
                .iter()
                .filter(|s| s.decode_index.is_some())
                .collect();
            let longest = members.iter().map(|s| s.past + s.new).max().unwrap_or(1);
            let count = members.len();
            let mut history = Vec::with_capacity(count * longest);
            let mut mask = Vec::with_capacity(count * longest);
            for seq in &members {
                let len = seq.past + seq.new;
                for t in 0..longest {
                    let row = if t < len { seq.start + t } else { seq.start };
                    history.push(row as u32);
                    mask.push(if t < len { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let query_rows = if all_decode_in_order {
                None
            } else {
                Some(Tensor::from_vec(decoding.clone(), count, device)?)
            };
            Some(DecodeBatch {
                count,
                longest,
                query_rows,
                history_rows: Tensor::from_vec(history, count * longest, device)?,
                mask: Tensor::from_vec(mask, (1, count, 1, longest), device)?,
            })
        };
        Ok(Self {
            sequences,
            write,
            decode,
            fused,
            all_decode_in_order,
            cpu_prefill: cpu_attention::supported(
                device,
                model.dtype,
                model.kv_dtype(),
                model.config.head_dim(),
            ),
        })
    }
}
