//! `--url`: one GGUF file or archive over http(s), checked against its SHA-256.

use std::path::Path;

use reqwest::Url;

use super::archive::{self, Compression};
use super::error::FetchError;
use super::http::{HttpClient, display_url};
use super::{Fetched, PARTIAL};

/// A `--sha256` value: 64 hex digits, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    /// Accepts upper- or lowercase hex.
    pub fn parse(value: &str) -> Result<Self, FetchError> {
        let trimmed = value.trim();
        if trimmed.len() == 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(trimmed.to_ascii_lowercase()))
        } else {
            Err(FetchError::InvalidSha256 {
                value: value.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the last path segment of a URL says the download is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Saved as this file name (a `.gguf`, or anything that is not an archive).
    File(String),
    /// Unpacked into the output directory.
    Archive(Compression),
}

/// Checks the scheme and reads the file name from the last path segment.
pub fn parse(url: &str) -> Result<(Url, Payload), FetchError> {
    let invalid = |reason: &str| FetchError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("only http:// and https:// are supported"));
    }
    let name = parsed
        .path_segments()
        .and_then(|mut segments| segments.next_back())
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() || name == "." || name == ".." || name.contains('\\') {
        return Err(invalid("its path does not end in a file name"));
    }
    if name.starts_with(".llama-fetch") || name == PARTIAL {
        return Err(invalid("its file name is reserved for fetch's own files"));
    }
    let lower = name.to_ascii_lowercase();
    let payload = if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        Payload::Archive(Compression::Gzip)
    } else if lower.ends_with(".tar") {
        Payload::Archive(Compression::None)
    } else {
        Payload::File(name)
    };
    Ok((parsed, payload))
}

/// Downloads `url` into `out/.partial`, verifies it, then renames or unpacks it into `out`.
/// On any failure nothing but what `out` held before is left.
pub async fn fetch(
    client: &HttpClient,
    url: &Url,
    payload: &Payload,
    sha256: Option<&Sha256Hex>,
    out: &Path,
) -> Result<Fetched, FetchError> {
    let partial = out.join(PARTIAL);
    let label = match payload {
        Payload::File(name) => name.clone(),
        Payload::Archive(_) => display_url(url),
    };
    let result = download_and_place(client, url, payload, sha256, out, &partial, &label).await;
    if result.is_err() {
        // Best effort: the partial file may not exist, and the original error matters more.
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result
}

async fn download_and_place(
    client: &HttpClient,
    url: &Url,
    payload: &Payload,
    sha256: Option<&Sha256Hex>,
    out: &Path,
    partial: &Path,
    label: &str,
) -> Result<Fetched, FetchError> {
    let downloaded = client.download(url, partial, label).await?;
    if let Some(expected) = sha256
        && expected.as_str() != downloaded.sha256
    {
        return Err(FetchError::Checksum {
            url: display_url(url),
            expected: expected.as_str().to_owned(),
            actual: downloaded.sha256,
        });
    }
    match payload {
        Payload::File(name) => {
            let dest = out.join(name);
            tokio::fs::rename(partial, &dest)
                .await
                .map_err(FetchError::io("move the download to", &dest))?;
            Ok(Fetched {
                files: 1,
                bytes: downloaded.bytes,
            })
        }
        Payload::Archive(compression) => {
            let (archive_path, out_dir, compression) =
                (partial.to_owned(), out.to_owned(), *compression);
            let shown = display_url(url);
            let unpacked = tokio::task::spawn_blocking(move || {
                archive::unpack(&archive_path, &out_dir, compression, &shown)
            })
            .await
            .map_err(|e| FetchError::Io {
                action: "unpack into",
                path: out.to_owned(),
                source: std::io::Error::other(e),
            })??;
            tokio::fs::remove_file(partial)
                .await
                .map_err(FetchError::io("remove", partial))?;
            Ok(unpacked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_hex_of_64_digits_in_any_case() {
        let upper = "AB".repeat(32);
        assert_eq!(
            Sha256Hex::parse(&upper).expect("valid").as_str(),
            "ab".repeat(32)
        );
        assert!(Sha256Hex::parse("abc").is_err());
        assert!(Sha256Hex::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn the_file_name_decides_file_or_archive() {
        let payload = |url: &str| parse(url).map(|(_, p)| p);
        assert_eq!(
            payload("https://h/m/Llama-3.2-1B.Q4_K_M.gguf?sig=1").expect("gguf"),
            Payload::File("Llama-3.2-1B.Q4_K_M.gguf".into())
        );
        assert_eq!(
            payload("http://h/llama.TAR.GZ").expect("tgz"),
            Payload::Archive(Compression::Gzip)
        );
        assert_eq!(
            payload("http://h/llama.tgz").expect("tgz"),
            Payload::Archive(Compression::Gzip)
        );
        assert_eq!(
            payload("http://h/llama.tar").expect("tar"),
            Payload::Archive(Compression::None)
        );
        assert_eq!(
            payload("http://h/weights.bin").expect("other"),
            Payload::File("weights.bin".into())
        );
    }

    #[test]
    fn urls_without_a_file_name_or_of_other_schemes_are_refused() {
        for url in [
            "ftp://h/m.gguf",
            "https://h/models/",
            "not a url",
            "https://h/.partial",
            "https://h/.llama-fetch-complete",
        ] {
            let err = parse(url).expect_err(url);
            assert!(matches!(err, FetchError::InvalidUrl { .. }), "{url}: {err}");
        }
    }
}
