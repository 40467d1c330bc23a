//! The `llama.*` metadata of a GGUF file, read into the engine's [`LlamaConfig`].

use candle_core::quantized::gguf_file::Value;

use super::file::GgufFile;
use super::layout;
use crate::engine::config::{LlamaConfig, TokenIds};
use crate::engine::error::{EngineError, Result};

/// Typed access to a file's metadata; every error names the file and the key.
pub(super) struct Metadata<'a> {
    pub(super) file: &'a GgufFile,
}

impl<'a> Metadata<'a> {
    pub(super) fn error(&self, key: &str, reason: impl Into<String>) -> EngineError {
        EngineError::GgufMetadata {
            path: self.file.path().to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    /// An unsigned integer, whatever integer width the writer chose.
    pub(super) fn optional_count(&self, key: &str) -> Result<Option<usize>> {
        let Some(value) = self.file.metadata().get(key) else {
            return Ok(None);
        };
        let number = match *value {
            Value::U8(v) => Some(u64::from(v)),
            Value::U16(v) => Some(u64::from(v)),
            Value::U32(v) => Some(u64::from(v)),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        };
        number
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                self.error(
                    key,
                    format!("expected a non-negative integer, found {value:?}"),
                )
            })
    }

    fn count(&self, key: &str) -> Result<usize> {
        self.optional_count(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn optional_float(&self, key: &str) -> Result<Option<f64>> {
        match self.file.metadata().get(key) {
            None => Ok(None),
            // The decimal the writer started from (1e-5, not 9.99999974e-6): its f32 is the
            // same, and the configuration reads like config.json.
            Some(Value::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.error(key, format!("expected a float, found {other:?}"))),
        }
    }

    pub(super) fn optional_string(&self, key: &str) -> Result<Option<&str>> {
        match self.file.metadata().get(key) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v)),
            Some(other) => Err(self.error(key, format!("expected a string, found {other:?}"))),
        }
    }

    /// An array; the error names its type, not its (possibly long) contents.
    pub(super) fn optional_array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.file.metadata().get(key) {
            None => Ok(None),
            Some(Value::Array(v)) => Ok(Some(v)),
            Some(other) => Err(self.error(
                key,
                format!("expected an array, found a {:?}", other.value_type()),
            )),
        }
    }
}

/// The architecture named by `general.architecture`.
pub fn architecture(file: &GgufFile) -> Result<String> {
    let meta = Metadata { file };
    meta.optional_string("general.architecture")?
        .map(str::to_owned)
        .ok_or_else(|| meta.error("general.architecture", "missing"))
}

/// The configuration of the Llama model in `file`, validated.
///
/// `vocab_size` comes from the shape of `token_embd.weight` and `tie_word_embeddings` from the
/// absence of `output.weight`, as in llama.cpp. `rope_scaling` is always `None`: the Llama 3
/// scaling of a GGUF file is its `rope_freqs.weight` tensor (see [`super::layout`]).
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let architecture = architecture(file)?;
    if architecture != "llama" {
        return Err(EngineError::UnsupportedArchitecture {
            path: file.path().to_owned(),
            architecture,
        });
    }
    let meta = Metadata { file };
    let key = |name: &str| format!("llama.{name}");
    let hidden_size = meta.count(&key("embedding_length"))?;
    let heads = meta.count(&key("attention.head_count"))?;
    let kv_heads = meta.optional_count(&key("attention.head_count_kv"))?;
    let key_length = meta.optional_count(&key("attention.key_length"))?;
    let head_dim = key_length
        .or(meta.optional_count(&key("rope.dimension_count"))?)
        .unwrap_or(hidden_size / heads.max(1));
    if let Some(value_length) = meta.optional_count(&key("attention.value_length"))?
        && value_length != head_dim
    {
        return Err(meta.error(
            &key("attention.value_length"),
            format!("{value_length} differs from the key length {head_dim}"),
        ));
    }
    if let Some(rotary) = meta.optional_count(&key("rope.dimension_count"))?
        && rotary != head_dim
    {
        return Err(meta.error(
            &key("rope.dimension_count"),
            format!(
                "partial rotary embeddings ({rotary} of {head_dim} dimensions) are not supported"
            ),
        ));
    }

    let embedding = file.shape(layout::TOKEN_EMBD)?;
    let [vocab_size, embedding_width] = *embedding else {
        return Err(EngineError::TensorShapeMismatch {
            name: layout::TOKEN_EMBD.to_owned(),
            path: file.path().to_owned(),
            expected: vec![0, hidden_size],
            actual: embedding.to_vec(),
        });
    };
    if embedding_width != hidden_size {
        return Err(EngineError::TensorShapeMismatch {
            name: layout::TOKEN_EMBD.to_owned(),
            path: file.path().to_owned(),
            expected: vec![vocab_size, hidden_size],
            actual: embedding.to_vec(),
        });
    }
    if let Some(declared) = meta.optional_count(&key("vocab_size"))?
        && declared != vocab_size
    {
        return Err(meta.error(
            &key("vocab_size"),
            format!(
                "{declared} differs from the {vocab_size} rows of {}",
                layout::TOKEN_EMBD
            ),
        ));
    }

    let config = LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        vocab_size,
        hidden_size,
        intermediate_size: meta.count(&key("feed_forward_length"))?,
        num_hidden_layers: meta.count(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads.unwrap_or(heads)),
        head_dim: Some(head_dim),
        max_position_embeddings: meta.count(&key("context_length"))?,
        rms_norm_eps: meta
            .optional_float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| meta.error(&key("attention.layer_norm_rms_epsilon"), "missing"))?,
        // llama.cpp's default when the key is absent.
        rope_theta: meta
            .optional_float(&key("rope.freq_base"))?
            .unwrap_or(10_000.0),
        rope_scaling: None,
        tie_word_embeddings: !file.contains(layout::OUTPUT),
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: token_id(&meta, "tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id(&meta, "tokenizer.ggml.eos_token_id")?.map(TokenIds::One),
        torch_dtype: None,
    };
    config.validate().map_err(|err| match err {
        EngineError::InvalidConfig { field, reason } => EngineError::GgufMetadata {
            path: file.path().to_owned(),
            key: gguf_key_of(field),
            reason,
        },
        other => other,
    })?;
    Ok(config)
}

/// The GGUF key a `config.json` field is read from, for errors.
fn gguf_key_of(field: &str) -> String {
    let key = match field {
        "vocab_size" => "token_embd.weight (its rows)",
        "hidden_size" => "llama.embedding_length",
        "intermediate_size" => "llama.feed_forward_length",
        "num_hidden_layers" => "llama.block_count",
        "num_attention_heads" => "llama.attention.head_count",
        "num_key_value_heads" => "llama.attention.head_count_kv",
        "head_dim" => "llama.attention.key_length",
        "max_position_embeddings" => "llama.context_length",
        "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
        "rope_theta" => "llama.rope.freq_base",
        other => return format!("llama.* ({other})"),
    };
    key.to_owned()
}

fn token_id(meta: &Metadata<'_>, key: &str) -> Result<Option<u32>> {
    meta.optional_count(key)?
        .map(|id| u32::try_from(id).map_err(|_| meta.error(key, format!("{id} is not a token id"))))
        .transpose()
}

/// How llama.cpp's optional `llama.rope.scaling.*` keys scale the rotary frequencies: one
/// divisor for every frequency (`linear`), or none.
pub fn linear_rope_factor(file: &GgufFile) -> Result<Option<f32>> {
    let meta = Metadata { file };
    let type_key = "llama.rope.scaling.type";
    match meta.optional_string(type_key)? {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor_key = "llama.rope.scaling.factor";
            let factor = meta
                .optional_float(factor_key)?
                .ok_or_else(|| meta.error(factor_key, "missing for linear rope scaling"))?;
            if factor.is_finite() && factor > 0.0 {
                Ok(Some(factor as f32))
            } else {
                Err(meta.error(factor_key, format!("{factor} is not a positive number")))
            }
        }
        Some(other) => Err(meta.error(
            type_key,
            format!(
                "rope scaling {other:?} is not supported (Llama 3 scaling is read from the \
                 {} tensor; `linear` is also understood)",
                layout::ROPE_FREQS
            ),
        )),
    }
}
