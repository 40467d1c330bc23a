//! The error type of the engine layer: loading a model, tokenizing, rendering prompts, generating.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Messages name the file, field or tensor at
/// fault so that an operator reading a log line knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` (or another JSON file) is not valid JSON of the expected shape.
    #[error("{path} is not valid: {reason}")]
    InvalidJson { path: PathBuf, reason: String },
    /// A field of `config.json` holds a value the engine cannot run.
    #[error("config.json field `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A safetensors file could not be parsed.
    #[error("{path} is not a valid safetensors file: {reason}")]
    CorruptWeights { path: PathBuf, reason: String },
    /// A tensor the architecture needs is in none of the weight files.
    #[error("tensor `{name}` is missing from {files}")]
    MissingTensor { name: String, files: String },
    /// A tensor's stored shape disagrees with the shape the configuration (`config.json` or the
    /// GGUF metadata) implies.
    #[error(
        "tensor `{name}` in {path} has shape {actual:?}, but the model configuration implies \
         {expected:?}"
    )]
    TensorShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A GGUF file could not be parsed, or holds a tensor the engine cannot read.
    #[error("{path} is not a GGUF file this engine can read: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    /// A GGUF metadata key the engine needs is missing or holds an unusable value.
    #[error("{path}: GGUF metadata `{key}`: {reason}")]
    GgufMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// The GGUF file holds a model of an architecture other than Llama.
    #[error(
        "{path} holds a `{architecture}` model (general.architecture); only `llama` is supported"
    )]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    /// The prompt (plus what is already cached) does not fit the model's context window.
    #[error("prompt of {tokens} tokens does not fit the context window of {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    /// A request to the model itself was malformed (for example an empty token list).
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is missing or failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A sampling parameter is outside its allowed range.
    #[error("sampling parameter `{name}`: {reason}")]
    InvalidSampling { name: &'static str, reason: String },
    /// An error of the tensor library while computing.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result type of the engine layer.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// A short stable label, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::InvalidJson { .. } => "invalid_json",
            Self::InvalidConfig { .. } => "invalid_config",
            Self::CorruptWeights { .. } => "corrupt_weights",
            Self::MissingTensor { .. } => "missing_tensor",
            Self::TensorShapeMismatch { .. } => "tensor_shape_mismatch",
            Self::InvalidGguf { .. } => "invalid_gguf",
            Self::GgufMetadata { .. } => "gguf_metadata",
            Self::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::InvalidInput(_) => "invalid_input",
            Self::Tokenizer(_) => "tokenizer",
            Self::ChatTemplate(_) => "chat_template",
            Self::InvalidSampling { .. } => "invalid_sampling",
            Self::Tensor(_) => "tensor",
        }
    }
}
