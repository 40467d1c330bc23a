//! The server's configuration file (`serve --config FILE`), as the operator writes it into the
//! `<name>-server` ConfigMap (`server.yaml`), plus the engine and HTTP settings an operator of
//! the server may tune. Every field has a default, so `{}` is a valid file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `serve` needs besides the listen address.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The model name `/info`, `/v1/models` and responses report.
    pub model_name: String,
    /// A Hugging Face model directory, a `.gguf` file, a directory holding exactly one `.gguf`
    /// file (with `format: gguf`), or `demo` (a random-weight tiny model generated at start from
    /// the bundled tokenizer).
    pub model_path: String,
    /// `safetensors` or `gguf`. A file path is read as GGUF and a directory as safetensors, except
    /// that with `gguf` a directory is taken to hold exactly one `.gguf` file.
    pub format: Option<String>,
    /// Context window to serve: prompt and completion together, at most the model's own
    /// (the default). A request's prompt must leave room for one token, and no completion
    /// runs past it (`finish_reason: length`).
    pub context_length: Option<usize>,
    /// GPUs per instance, as the operator planned them (`tensorParallel`, the field's earlier
    /// name, is read too). On a GPU the model's decoder layers are split over this many GPUs,
    /// from the device's ordinal on (`cuda:N` to `cuda:N+gpus-1`), each holding its layers'
    /// weights and keys and values, the first also the embedding and output projection.
    /// Unset or 1: one GPU. The CPU is one device whatever the number.
    #[serde(alias = "tensorParallel")]
    pub gpus: Option<u32>,
    /// The GGUF weight type (llama.cpp's name, e.g. `Q4_K_M`) the operator sized the GPU memory
    /// and cache budget for. A GGUF file whose `general.file_type` names another type is
    /// refused at load, naming both; unset, nothing is checked.
    pub weight_type: Option<String>,
    /// Where the Llama 3 tokenizer lives: for the demo model (default
    /// `$LLAMA_SERVER_TOKENIZER_DIR`), and for a GGUF file without a `tokenizer.json` beside it,
    /// before the tokenizer in the file's metadata (see `state::tokenizer_source_for`).
    pub tokenizer_dir: Option<PathBuf>,
    /// Compute device: `cpu` (the default), `cuda` or `cuda:N`; the engine runs in f32 on the
    /// CPU and bf16 on a GPU. `serve --device` and `$LLAMA_SERVER_DEVICE` override it.
    pub device: Option<String>,
    pub auth: AuthConfig,
    pub rate_limits: RateLimitsConfig,
    pub content_safety: ContentSafetyConfig,
    pub engine: EngineConfig,
    pub http: HttpConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "llama-demo".into(),
            model_path: "demo".into(),
            format: None,
            context_length: None,
            gpus: None,
            weight_type: None,
            tokenizer_dir: None,
            device: None,
            auth: AuthConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            content_safety: ContentSafetyConfig::default(),
            engine: EngineConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// How clients authenticate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Directory holding the files `primaryKey` and `secondaryKey` (a mounted Secret). Re-read
    /// when they change.
    pub keys_dir: PathBuf,
    /// Token (JWT) settings for `mode: token`.
    pub token: Option<TokenConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Key,
            keys_dir: PathBuf::from("/var/run/llama-server/keys"),
            token: None,
        }
    }
}

/// The authentication mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AuthMode {
    /// Either of two keys, in `api-key` or `Authorization`.
    Key,
    /// An Entra ID style JWT in `Authorization: Bearer`.
    Token,
    /// No authentication: for local trials only; logged loudly at start.
    None,
}

/// What a valid JWT must carry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// The issuer's signing keys (JWKS JSON). Defaults to `/var/run/llama-server/jwks/jwks.json`,
    /// where the operator mounts the referenced ConfigMap. Re-read when it changes.
    #[serde(default = "default_jwks_file")]
    pub jwks_file: PathBuf,
    /// Written by the operator; the file above is what is read.
    #[serde(default)]
    pub jwks_config_map_ref: Option<serde_json::Value>,
}

fn default_jwks_file() -> PathBuf {
    PathBuf::from("/var/run/llama-server/jwks/jwks.json")
}

/// Per-instance rate limits (every instance of a deployment enforces them).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: u64,
    /// Requests per minute.
    pub requests_per_minute: u64,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            tokens_per_minute: 200_000,
            requests_per_minute: 1_000,
        }
    }
}

/// Content safety of prompts and completions.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ContentSafetyConfig {
    pub enabled: bool,
    /// Extra phrases that flag a text (case-insensitive), added to the built-in list.
    pub blocklist: Vec<String>,
    /// A Llama Guard 3 model (Hugging Face directory) that judges prompts and completions
    /// besides the blocklist.
    pub llama_guard: Option<LlamaGuardConfig>,
}

/// The Llama Guard classifier.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlamaGuardConfig {
    /// The model directory.
    pub model_path: PathBuf,
    /// When the classifier cannot give a verdict (an unexpected answer, an engine error):
    /// refuse the text (`true`) or let it pass and count the failure (`false`, the default).
    #[serde(default)]
    pub fail_closed: bool,
}

/// The scheduler's limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most sequences decoding together.
    pub max_batch_size: usize,
    /// KV-cache budget in tokens, summed over running sequences (each reserves its prompt
    /// plus its `max_tokens`). Unset: 4 full context windows.
    pub kv_cache_tokens: Option<usize>,
    /// Element type of the KV cache. `auto` (the default): 16-bit (`f16`) when the weights
    /// are stored at 16 bits or fewer (bf16/f16 safetensors, any quantized GGUF), else the
    /// compute dtype; `f32` or `f16` choose it outright. `f16` halves the cache's memory and
    /// the bytes each decode step reads from it, for a rounding of keys and values to 11
    /// significant bits.
    pub kv_cache_dtype: KvCacheDtype,
    /// Most requests waiting for a batch slot; beyond it callers get 429.
    pub max_queue: usize,
    /// Most prompt tokens one step processes, so a long prompt does not stall decoding.
    pub prefill_chunk_tokens: usize,
    /// Keep the keys and values of finished requests in the KV budget's free room, so that a
    /// prompt starting with tokens seen before (the conversation so far, a shared system
    /// prompt) computes only the rest. Entries are evicted, least recently used first,
    /// whenever an admission needs their room.
    pub prefix_cache: bool,
    /// Seed of the demo model's random weights.
    pub demo_seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            kv_cache_tokens: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            max_queue: 64,
            prefill_chunk_tokens: 512,
            prefix_cache: true,
            demo_seed: 42,
        }
    }
}

/// Element type of the key/value cache (`engine.kvCacheDtype`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// 16-bit for weights stored at 16 bits or fewer, else the compute dtype.
    #[default]
    Auto,
    F32,
    F16,
}

impl KvCacheDtype {
    /// The dtype chosen outright; `None` for `auto` (the loader's choice stands).
    pub fn chosen(self) -> Option<candle_core::DType> {
        match self {
            Self::Auto => None,
            Self::F32 => Some(candle_core::DType::F32),
            Self::F16 => Some(candle_core::DType::F16),
        }
    }
}

/// HTTP-layer limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl ServerConfig {
    /// Reads and checks a YAML (or JSON) configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// GPUs the model is split over on a GPU device (`gpus`, 1 when unset).
    pub fn gpu_count(&self) -> usize {
        self.gpus.map_or(1, |n| n.max(1) as usize)
    }

    /// Parses and checks configuration text; the error names the field.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|err| err.to_string())?
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.model_name.trim().is_empty() {
            return Err("modelName must not be empty".into());
        }
        if self.gpus == Some(0) {
            return Err("gpus must be at least 1 (leave it unset for one GPU)".into());
        }
        if self.engine.max_batch_size == 0 {
            return Err("engine.maxBatchSize must be at least 1".into());
        }
        if self.engine.kv_cache_tokens.is_some_and(|t| t < 2) {
            return Err(
                "engine.kvCacheTokens must be at least 2 (a one-token prompt and one token of answer); leave it unset for the default of four context windows"
                    .into(),
            );
        }
        if self.engine.prefill_chunk_tokens == 0 {
            return Err("engine.prefillChunkTokens must be at least 1".into());
        }
        if self.rate_limits.requests_per_minute == 0 || self.rate_limits.tokens_per_minute == 0 {
            return Err(
                "rateLimits.requestsPerMinute and rateLimits.tokensPerMinute must be at least 1"
                    .into(),
            );
        }
        if let Some(device) = &self.device {
            device
                .parse::<crate::device::DeviceSpec>()
                .map_err(|err| format!("device: {err}"))?;
        }
        if self.auth.mode == AuthMode::Token && self.auth.token.is_none() {
            return Err("auth.token (issuer, audience) is required with auth.mode: token".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_file_parses() {
        let text = r#"
modelName: Meta-Llama-3.1-8B-Instruct
modelPath: demo
format: safetensors
contextLength: 131072
tensorParallel: 2
auth:
  mode: key
  keysDir: /var/run/llama-server/keys
  token: null
rateLimits:
  tokensPerMinute: 200000
  requestsPerMinute: 1000
contentSafety:
  enabled: false
  blocklist: []
"#;
        let config = ServerConfig::from_yaml(text).expect("config");
        assert_eq!(config.model_name, "Meta-Llama-3.1-8B-Instruct");
        assert_eq!(config.gpus, Some(2), "tensorParallel is read as gpus");
        assert_eq!(config.gpu_count(), 2);
        assert_eq!(config.context_length, Some(131072));
        assert_eq!(config.auth.mode, AuthMode::Key);
        assert_eq!(config.engine, EngineConfig::default());
    }

    #[test]
    fn gpus_counts_at_least_one() {
        assert_eq!(
            ServerConfig::from_yaml("gpus: 4")
                .expect("gpus")
                .gpu_count(),
            4
        );
        assert_eq!(ServerConfig::default().gpu_count(), 1);
        let err = ServerConfig::from_yaml("gpus: 0").expect_err("zero GPUs");
        assert!(err.contains("gpus must be at least 1"), "{err}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            ServerConfig::from_yaml("").expect("config"),
            ServerConfig::default()
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let err = ServerConfig::from_yaml("modelNmae: x").expect_err("unknown field");
        assert!(err.contains("modelNmae"), "{err}");
        let err = ServerConfig::from_yaml("engine: {maxBatchSize: 0}").expect_err("zero");
        assert!(err.contains("engine.maxBatchSize"), "{err}");
        let err = ServerConfig::from_yaml("engine: {kvCacheTokens: 1}").expect_err("one");
        assert!(
            err.contains("engine.kvCacheTokens must be at least 2"),
            "{err}"
        );
        let err = ServerConfig::from_yaml("auth: {mode: token}").expect_err("no token");
        assert!(err.contains("auth.token"), "{err}");
        let err = ServerConfig::from_yaml("auth: {mode: magic}").expect_err("bad mode");
        assert!(err.contains("magic"), "{err}");
        let err = ServerConfig::from_yaml("device: tpu").expect_err("bad device");
        assert!(err.contains("device: unknown device 'tpu'"), "{err}");
        let config = ServerConfig::from_yaml("device: cuda:1").expect("config");
        assert_eq!(config.device.as_deref(), Some("cuda:1"));
        let err = ServerConfig::from_yaml("engine: {kvCacheDtype: fp8}").expect_err("fp8");
        assert!(
            err.contains("engine.kvCacheDtype") && err.contains("fp8"),
            "{err}"
        );
    }

    #[test]
    fn the_kv_cache_dtype_is_auto_unless_chosen() {
        assert_eq!(
            ServerConfig::default().engine.kv_cache_dtype,
            KvCacheDtype::Auto
        );
        for (text, want) in [
            ("auto", KvCacheDtype::Auto),
            ("f32", KvCacheDtype::F32),
            ("f16", KvCacheDtype::F16),
        ] {
            let config = ServerConfig::from_yaml(&format!("engine: {{kvCacheDtype: {text}}}"))
                .expect("config");
            assert_eq!(config.engine.kv_cache_dtype, want, "{text}");
        }
    }
}
