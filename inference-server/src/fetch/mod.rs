//! `llama-server fetch`: downloads model weights into a directory, for the operator's
//! `fetch-model` init container.
//!
//! A source is a URL (a GGUF file, a `.tar`/`.tar.gz` archive, or any single file) or a Hugging
//! Face repository revision. Every download goes to `<out>/.partial` and takes its real name only
//! once complete (and verified, with `--sha256`); archives are unpacked through a staging
//! directory. A finished fetch writes `<out>/.llama-fetch-complete` holding the source, so a
//! restarted pod whose volume survived skips the download.

pub mod archive;
pub mod error;
pub mod http;
pub mod hugging_face;
pub mod progress;
pub mod url;

use std::path::{Path, PathBuf};
use std::time::Instant;

use self::url::{Payload, Sha256Hex};
pub use error::FetchError;
use http::{HttpClient, RetryPolicy, Token, display_url};
use hugging_face::Repository;
use reqwest::Url;

/// Where a download is written until it is complete.
pub const PARTIAL: &str = ".partial";
/// Where an archive is unpacked until all of it was read.
pub const UNPACKING: &str = ".unpacking";
/// Written last; its content is the source's description.
pub const MARKER: &str = ".llama-fetch-complete";
/// The Hugging Face endpoint when `HF_ENDPOINT` is not set.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// Files and bytes a fetch wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    pub files: u64,
    pub bytes: u64,
}

/// Where the weights come from.
#[derive(Debug, Clone)]
pub enum Source {
    Url {
        url: Url,
        payload: Payload,
        sha256: Option<Sha256Hex>,
    },
    HuggingFace {
        repository: Repository,
        token: Option<Token>,
    },
}

impl Source {
    /// A `--url` source; `sha256` is hex in either case.
    pub fn url(url: &str, sha256: Option<&str>) -> Result<Self, FetchError> {
        let (url, payload) = url::parse(url)?;
        let sha256 = sha256.map(Sha256Hex::parse).transpose()?;
        Ok(Self::Url {
            url,
            payload,
            sha256,
        })
    }

    /// A `--hugging-face` source. `endpoint` is `HF_ENDPOINT` when set; an empty token counts as
    /// none (an optional Secret key that is missing).
    pub fn hugging_face(
        repository: &str,
        revision: &str,
        endpoint: Option<&str>,
        token: Option<String>,
    ) -> Result<Self, FetchError> {
        let endpoint_str = endpoint
            .filter(|e| !e.trim().is_empty())
            .unwrap_or(DEFAULT_HF_ENDPOINT);
        let endpoint = Url::parse(endpoint_str)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| FetchError::InvalidUrl {
                url: endpoint_str.to_owned(),
                reason: "HF_ENDPOINT must be an http:// or https:// URL".to_owned(),
            })?;
        let token = token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(Token::new);
        let repository = Repository::new(endpoint, repository, revision, token.is_some())?;
        Ok(Self::HuggingFace { repository, token })
    }

    /// Takes the repository's `.gguf` file of `gguf_type` (a Hugging Face source; a URL names
    /// its one file itself).
    pub fn with_gguf_type(mut self, gguf_type: Option<String>) -> Self {
        if let Self::HuggingFace { repository, .. } = &mut self {
            repository.gguf_type = gguf_type;
        }
        self
    }

    /// What the completion marker holds: enough to tell a different source, and no secret.
    pub fn describe(&self) -> String {
        match self {
            Self::Url { url, sha256, .. } => match sha256 {
                Some(sha) => format!("url {url} sha256 {}", sha.as_str()),
                None => format!("url {url}"),
            },
            Self::HuggingFace { repository, .. } => match &repository.gguf_type {
                Some(t) => format!(
                    "hugging-face {}@{} gguf {t} from {}",
                    repository.name, repository.revision, repository.endpoint
                ),
                None => format!(
                    "hugging-face {}@{} from {}",
                    repository.name, repository.revision, repository.endpoint
                ),
            },
        }
    }

    /// The description for log lines: URLs without their query, which may hold a signature.
    fn shown(&self) -> String {
        match self {
            Self::Url { url, .. } => format!("url {}", display_url(url)),
            Self::HuggingFace { repository, .. } => {
                format!("hugging-face {}@{}", repository.name, repository.revision)
            }
        }
    }
}

/// One fetch: a source and the directory to fill.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub source: Source,
    pub out: PathBuf,
    pub retry: RetryPolicy,
}

impl Fetch {
    /// Runs the fetch to completion on its own single-threaded runtime.
    pub fn run(&self) -> Result<(), FetchError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| FetchError::Io {
                action: "start the async runtime for",
                path: self.out.clone(),
                source,
            })?;
        runtime.block_on(self.run_async())
    }

    /// Skips when `out` already holds this source, else downloads it and writes the marker.
    pub async fn run_async(&self) -> Result<(), FetchError> {
        let out = &self.out;
        tokio::fs::create_dir_all(out)
            .await
            .map_err(FetchError::io("create", out))?;
        let marker = out.join(MARKER);
        let description = self.source.describe();
        if let Ok(done) = tokio::fs::read_to_string(&marker).await
            && done.trim_end() == description
        {
            println!(
                "fetch: {} already in {}, nothing to do",
                self.source.shown(),
                out.display()
            );
            return Ok(());
        }
        // A different source, or an interrupted run: start from a clean slate of our own files.
        for leftover in [MARKER, PARTIAL, UNPACKING] {
            archive::remove_if_present(&out.join(leftover))?;
        }
        println!("fetch: {} into {}", self.source.shown(), out.display());
        let started = Instant::now();
        let fetched = match &self.source {
            Source::Url {
                url,
                payload,
                sha256,
            } => {
                let client = HttpClient::new(None, self.retry)?;
                url::fetch(&client, url, payload, sha256.as_ref(), out).await?
            }
            Source::HuggingFace { repository, token } => {
                let client = HttpClient::new(token.clone(), self.retry)?;
                hugging_face::fetch(&client, repository, out).await?
            }
        };
        write_marker(&marker, &description).await?;
        println!(
            "fetch: done: {} file(s), {} in {:.1} s from {} into {}",
            fetched.files,
            progress::format_bytes(fetched.bytes),
            started.elapsed().as_secs_f64(),
            self.source.shown(),
            out.display()
        );
        Ok(())
    }
}

/// Writes the marker through a temporary name, so a crash never leaves half a marker.
async fn write_marker(marker: &Path, description: &str) -> Result<(), FetchError> {
    let temporary = marker.with_extension("tmp");
    tokio::fs::write(&temporary, format!("{description}\n"))
        .await
        .map_err(FetchError::io("write", &temporary))?;
    tokio::fs::rename(&temporary, marker)
        .await
        .map_err(FetchError::io("write", marker))
}

/// Writes `message` to Kubernetes' termination-message file, which must already exist (the
/// kubelet mounts it); anything that stops the write is ignored, as the message also goes to
/// stderr.
pub fn write_termination_message(path: &Path, message: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
    {
        let _ = file.write_all(message.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_name_the_source_and_never_the_token() {
        let hf = Source::hugging_face(
            "meta-llama/Llama-3.2-1B",
            "main",
            None,
            Some("hf_secret".into()),
        )
        .expect("source");
        let description = hf.describe();
        assert_eq!(
            description,
            "hugging-face meta-llama/Llama-3.2-1B@main from https://huggingface.co/"
        );
        assert!(!format!("{hf:?}").contains("hf_secret"));
        let url = Source::url("https://h/m.gguf?sig=s3cr3t", Some(&"AB".repeat(32))).expect("url");
        assert!(
            url.describe()
                .ends_with(&format!("sha256 {}", "ab".repeat(32)))
        );
        assert!(!url.shown().contains("s3cr3t"));
    }

    #[test]
    fn an_empty_token_is_no_token_and_a_bad_endpoint_is_an_error() {
        let Ok(Source::HuggingFace { token, repository }) =
            Source::hugging_face("org/name", "main", Some(""), Some(" ".into()))
        else {
            panic!("expected a hugging-face source");
        };
        assert!(token.is_none() && !repository.has_token);
        assert!(Source::hugging_face("org/name", "main", Some("file:///x"), None).is_err());
    }

    #[test]
    fn the_termination_message_goes_only_to_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("llama-fetch-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let existing = dir.join("termination-log");
        std::fs::write(&existing, "old and longer").expect("file");
        write_termination_message(&existing, "boom");
        assert_eq!(std::fs::read_to_string(&existing).expect("read"), "boom");
        let missing = dir.join("missing");
        write_termination_message(&missing, "boom");
        assert!(!missing.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
