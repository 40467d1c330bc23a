//! `FetchError`, the one error type of the `fetch` layer.

use std::path::PathBuf;

/// Why `llama-server fetch` failed. The message is what the operator shows in the
/// LlamaDeployment's `ModelLoaded` condition, so each one says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("invalid --sha256 {value:?}: expected 64 hexadecimal digits")]
    InvalidSha256 { value: String },

    #[error("invalid Hugging Face repository {repository:?}: expected ORG/NAME")]
    InvalidRepository { repository: String },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot start the HTTP client: {0}")]
    Client(reqwest::Error),

    /// `detail` is the whole chain of causes (reqwest's own message alone says little, such as
    /// "error sending request").
    #[error("request to {url} failed: {detail}")]
    Request { url: String, detail: String },

    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },

    #[error("{source} (gave up after {attempts} attempts)")]
    GaveUp {
        attempts: u32,
        source: Box<FetchError>,
    },

    #[error(
        "sha256 mismatch for {url}: expected {expected}, got {actual}; the download was discarded"
    )]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },

    #[error("unsafe archive entry {entry:?}: {reason}; nothing was unpacked")]
    UnsafeArchiveEntry { entry: String, reason: &'static str },

    #[error("cannot read the archive from {url}: {source}")]
    Archive { url: String, source: std::io::Error },

    #[error(
        "Hugging Face repository {repository} is gated or private (HTTP {status}) and no token was \
         given: set spec.source.huggingFace.tokenSecretRef to a Secret whose token has access \
         (the hub also answers {status} for a repository that does not exist)"
    )]
    GatedWithoutToken { repository: String, status: u16 },

    #[error(
        "Hugging Face repository {repository} is gated or private (HTTP {status}) and the token \
         in the Secret (HF_TOKEN) lacks access: accept the model's license with the token's \
         account, or reference a Secret with a token that has access"
    )]
    GatedTokenLacksAccess { repository: String, status: u16 },

    #[error(
        "Hugging Face repository {repository} or its revision {revision:?} was not found at {endpoint}"
    )]
    NotFound {
        repository: String,
        revision: String,
        endpoint: String,
    },

    #[error("cannot read the file list of {repository}@{revision}: {source}")]
    Listing {
        repository: String,
        revision: String,
        source: serde_json::Error,
    },

    #[error(
        "{repository}@{revision} holds neither *.safetensors nor *.gguf weights at its top level"
    )]
    NoWeights {
        repository: String,
        revision: String,
    },

    #[error(
        "{repository}@{revision} holds {count} .gguf files ({files}), and llama-server serves one: \
         name its type with spec.source.quantization (llama-server fetch --gguf-type), e.g. Q4_K_M"
    )]
    SeveralGguf {
        repository: String,
        revision: String,
        count: usize,
        files: String,
    },

    #[error(
        "{repository}@{revision} has no .gguf file of type {wanted} (a file whose name has the \
         word {wanted}); its .gguf files: {available}. Set spec.source.quantization \
         (llama-server fetch --gguf-type) to the type of one of them"
    )]
    NoGgufOfType {
        repository: String,
        revision: String,
        wanted: String,
        available: String,
    },

    #[error("{repository}@{revision} has safetensors weights but lacks {}", missing.join(", "))]
    MissingFiles {
        repository: String,
        revision: String,
        missing: Vec<String>,
    },
}

impl FetchError {
    /// Whether trying the same request again may succeed: connection and body errors, server
    /// errors and rate limiting. Local I/O and client errors are final.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Request { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The HTTP status of a request that was answered with an error, looking through retries.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::GaveUp { source, .. } => source.status(),
            _ => None,
        }
    }

    /// An `Io` error with what was being done and to which path.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}
