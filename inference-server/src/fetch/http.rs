//! The HTTP client of `fetch`: GETs with retries and backoff, downloads streamed to a file with
//! their SHA-256 computed on the way.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::FetchError;
use super::progress::Progress;

/// Bytes gathered before each write to the file.
const WRITE_BUFFER: usize = 4 << 20;

/// How often and how patiently a request is tried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled before each later one.
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            first_backoff: Duration::from_millis(500),
        }
    }
}

/// An access token. Its `Debug` hides the value, so it never reaches a log line.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A file written by [`HttpClient::download`].
#[derive(Debug, Clone, PartialEq)]
pub struct Downloaded {
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// A `reqwest` client, the token it sends, and its retry policy.
#[derive(Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
    token: Option<Token>,
    retry: RetryPolicy,
}

impl HttpClient {
    /// A client that sends `token` as `Authorization: Bearer` (reqwest drops it on redirects to
    /// another host, such as a CDN's signed URL).
    pub fn new(token: Option<Token>, retry: RetryPolicy) -> Result<Self, FetchError> {
        let inner = reqwest::Client::builder()
            .user_agent(concat!("llama-server-fetch/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(FetchError::Client)?;
        Ok(Self {
            inner,
            token,
            retry,
        })
    }

    /// The whole body of `url`, for small documents such as a file listing.
    pub async fn get_bytes(&self, url: &Url) -> Result<Vec<u8>, FetchError> {
        self.retrying(|| async {
            let response = self.send(url).await?;
            let body = response.bytes().await.map_err(|e| request_error(url, e))?;
            Ok(body.to_vec())
        })
        .await
    }

    /// Streams `url` into `dest` (created or truncated), printing progress as `label`.
    pub async fn download(
        &self,
        url: &Url,
        dest: &Path,
        label: &str,
    ) -> Result<Downloaded, FetchError> {
        self.retrying(|| self.download_once(url, dest, label)).await
    }

    async fn download_once(
        &self,
        url: &Url,
        dest: &Path,
        label: &str,
    ) -> Result<Downloaded, FetchError> {
        let mut response = self.send(url).await?;
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(FetchError::io("create", dest))?;
        // Network chunks are a few KiB; each tokio file write is a blocking-pool hop.
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut hasher = Sha256::new();
        let mut progress = Progress::new(label, response.content_length(), Instant::now());
        while let Some(chunk) = response.chunk().await.map_err(|e| request_error(url, e))? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(FetchError::io("write", dest))?;
            if let Some(line) = progress.advance(chunk.len() as u64, Instant::now()) {
                println!("{line}");
            }
        }
        file.flush().await.map_err(FetchError::io("write", dest))?;
        file.into_inner()
            .sync_all()
            .await
            .map_err(FetchError::io("write", dest))?;
        println!("{}", progress.finish(Instant::now()));
        Ok(Downloaded {
            bytes: progress.done(),
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Sends a GET; any status but 2xx is an error.
    async fn send(&self, url: &Url) -> Result<reqwest::Response, FetchError> {
        let mut request = self.inner.get(url.clone());
        if let Some(Token(token)) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| request_error(url, e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: display_url(url),
                status: status.as_u16(),
            });
        }
        Ok(response)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the tries run out.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let attempts = self.retry.attempts.max(1);
        let mut backoff = self.retry.first_backoff;
        let mut tried = 1;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_transient() && tried < attempts => {
                    println!(
                        "fetch: {err}; retrying in {:.1} s (attempt {}/{attempts})",
                        backoff.as_secs_f64(),
                        tried + 1
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                    tried += 1;
                }
                Err(err) if err.is_transient() => {
                    return Err(FetchError::GaveUp {
                        attempts,
                        source: Box::new(err),
                    });
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// `url` without its query and fragment, which may hold a signature.
pub fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

fn request_error(url: &Url, source: reqwest::Error) -> FetchError {
    let source = source.without_url();
    let mut detail = source.to_string();
    let mut cause = std::error::Error::source(&source);
    while let Some(err) = cause {
        let text = err.to_string();
        // hyper and reqwest often repeat the inner message in the outer one.
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        cause = err.source();
    }
    FetchError::Request {
        url: display_url(url),
        detail,
    }
}

/// Lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_signature() {
        let url = Url::parse("https://cdn.example/m.gguf?X-Amz-Signature=abc#x").expect("url");
        assert_eq!(display_url(&url), "https://cdn.example/m.gguf");
    }

    #[test]
    fn tokens_are_redacted_in_debug_output() {
        let client = HttpClient::new(Some(Token::new("hf_secret".into())), RetryPolicy::default())
            .expect("client");
        let shown = format!("{client:?}");
        assert!(!shown.contains("hf_secret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
