//! `config.json` of a Hugging Face Llama checkpoint, and the checks that make it runnable.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};

/// The fields of a Hugging Face `LlamaConfig` that the engine reads. Unknown fields are ignored,
/// so real checkpoints (which carry many more) load as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `["LlamaForCausalLM"]` for every Llama 3.x checkpoint.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `"llama"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads shared by groups of query heads.
    /// Absent means multi-head attention (as many as `num_attention_heads`).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// The context window in tokens.
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Llama 3.1+ frequency scaling; `null` for Llama 3.0.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// When true the output projection reuses `model.embed_tokens.weight` and there is no
    /// `lm_head.weight`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// A single id or a list of ids.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// The dtype the checkpoint was saved in (informative only).
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is a number in Llama 3.0 and a list in Llama 3.1+.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// The `rope_scaling` object of Llama 3.1+ checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"`; older checkpoints name it `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

fn default_model_type() -> String {
    "llama".to_owned()
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".to_owned()
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        let json = |err: serde_json::Error| EngineError::InvalidJson {
            path: path.to_owned(),
            reason: err.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
        // Another architecture lacks the text model's fields at the top: say what it is before
        // serde names the first missing one.
        check_model_type(value.get("model_type").and_then(serde_json::Value::as_str))?;
        let config: Self = serde_json::from_value(value).map_err(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Key/value heads (equal to the query heads when the checkpoint does not say).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the configuration describes a model this engine can run.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        // Far above any Llama model, far below what an allocation sized by them can survive: a
        // damaged file or config.json is refused here, before tables of that size are made.
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.kv_heads(), 1 << 12),
            ("head_dim", self.head_dim(), 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 26,
            ),
        ];
        for (field, value, limit) in bounded {
            if value > limit {
                return Err(invalid(
                    field,
                    format!(
                        "{value} is larger than any Llama model's (at most {limit} here): the \
                         model's configuration is damaged"
                    ),
                ));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("{} is not a positive even number", self.head_dim()),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if !finite_positive(self.rms_norm_eps) {
            return Err(invalid("rms_norm_eps", "must be greater than 0"));
        }
        if !finite_positive(self.rope_theta) {
            return Err(invalid("rope_theta", "must be greater than 0"));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("{:?} is not supported (only silu)", self.hidden_act),
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(invalid(
                "attention_bias",
                "biases are not supported by Llama 3 checkpoints",
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        Ok(())
    }
}

impl RopeScaling {
    fn validate(&self) -> Result<()> {
        if self.rope_type != "llama3" {
            return Err(invalid(
                "rope_scaling.rope_type",
                format!("{:?} is not supported (only llama3)", self.rope_type),
            ));
        }
        if !finite_positive(self.factor) {
            return Err(invalid("rope_scaling.factor", "must be greater than 0"));
        }
        if !finite_positive(self.low_freq_factor)
            || !finite_positive(self.high_freq_factor - self.low_freq_factor)
        {
            return Err(invalid(
                "rope_scaling.high_freq_factor",
                "must be greater than low_freq_factor, which must be greater than 0",
            ));
        }
        if self.original_max_position_embeddings == 0 {
            return Err(invalid(
                "rope_scaling.original_max_position_embeddings",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// True for finite numbers greater than 0 (false for NaN).
fn finite_positive(value: f64) -> bool {
    value.is_finite() && value > 0.0
}

/// Only text Llama checkpoints (`model_type: llama`, or none) run here.
fn check_model_type(model_type: Option<&str>) -> Result<()> {
    match model_type {
        None | Some("llama") => Ok(()),
        Some("mllama") => Err(invalid(
            "model_type",
            "\"mllama\" is Llama 3.2 Vision (image and text in), which llama-server does not \
             serve: it runs the text-only Llama 3.x models (model_type \"llama\")",
        )),
        Some(other) => Err(invalid(
            "model_type",
            format!("{other:?} is not supported (only \"llama\", the Llama 3.x text models)"),
        )),
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_31_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
      "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
      "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;

    fn parse(text: &str) -> LlamaConfig {
        serde_json::from_str(text).expect("config parses")
    }

    #[test]
    fn reads_a_real_llama_31_config() {
        let config = parse(LLAMA_31_8B);
        config.validate().expect("valid");
        assert_eq!(config.kv_heads(), 8);
        assert_eq!(config.head_dim(), 128);
        assert_eq!(
            config.eos_token_id.as_ref().map(TokenIds::to_vec),
            Some(vec![128001, 128008, 128009])
        );
        assert_eq!(config.rope_scaling.as_ref().map(|s| s.factor), Some(8.0));
    }

    #[test]
    fn a_vision_or_other_checkpoint_is_named_before_its_missing_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        // The top of Llama 3.2 11B Vision's config.json: its text model sits in text_config.
        std::fs::write(
            &path,
            r#"{"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
                "text_config": {"hidden_size": 4096}, "vision_config": {"hidden_size": 1280}}"#,
        )
        .expect("write");
        let err = LlamaConfig::from_file(&path).expect_err("vision");
        let text = err.to_string();
        assert!(text.starts_with("config.json field `model_type`"), "{text}");
        assert!(text.contains("Llama 3.2 Vision"), "{text}");
        std::fs::write(&path, LLAMA_31_8B.replace(r#""llama""#, r#""mistral""#)).expect("write");
        let err = LlamaConfig::from_file(&path).expect_err("mistral");
        assert!(
            err.to_string().contains("\"mistral\" is not supported"),
            "{err}"
        );
        std::fs::write(&path, LLAMA_31_8B).expect("write");
        LlamaConfig::from_file(&path).expect("a Llama 3.1 config loads");
    }

    #[test]
    fn sizes_beyond_any_llama_are_refused_before_anything_is_sized_by_them() {
        for (field, set) in [
            (
                "num_hidden_layers",
                &(|c: &mut LlamaConfig| c.num_hidden_layers = 1 << 40) as &dyn Fn(&mut LlamaConfig),
            ),
            ("max_position_embeddings", &|c| {
                c.max_position_embeddings = 1 << 27
            }),
            ("head_dim", &|c| c.head_dim = Some(1 << 13)),
            ("vocab_size", &|c| c.vocab_size = usize::MAX),
        ] {
            let mut config = parse(LLAMA_31_8B);
            set(&mut config);
            let err = config.validate().expect_err("too large");
            let text = err.to_string();
            assert!(text.contains(field) && text.contains("damaged"), "{text}");
        }
        // The largest Llama 3.1 (405B: 126 layers, hidden 16384, 53248 wide) is well inside.
        let mut config = parse(LLAMA_31_8B);
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
        ) = (126, 16384, 53248);
        config.num_attention_heads = 128;
        config.validate().expect("405B's shape");
    }

    #[test]
    fn rejects_heads_that_do_not_group() {
        let mut config = parse(LLAMA_31_8B);
        config.num_key_value_heads = Some(5);
        let err = config.validate().expect_err("invalid");
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn rejects_unknown_rope_type() {
        let mut config = parse(LLAMA_31_8B);
        if let Some(scaling) = config.rope_scaling.as_mut() {
            scaling.rope_type = "yarn".into();
        }
        let err = config.validate().expect_err("invalid");
        assert!(err.to_string().contains("rope_scaling.rope_type"), "{err}");
    }

    #[test]
    fn missing_field_names_the_field_and_file() {
        let dir = std::env::temp_dir().join(format!("llama-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"vocab_size": 10}"#).expect("write");
        let err = LlamaConfig::from_file(&path).expect_err("invalid");
        let message = err.to_string();
        assert!(
            message.contains("config.json") && message.contains("hidden_size"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
