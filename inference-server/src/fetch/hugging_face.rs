//! `--hugging-face`: the files a Llama model needs from a Hugging Face repository revision.

use std::path::Path;

use reqwest::Url;
use serde::Deserialize;

use super::error::FetchError;
use super::http::HttpClient;
use super::{Fetched, PARTIAL};

/// Files every safetensors layout needs.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];
/// Files taken when the repository has them.
const OPTIONAL: [&str; 3] = [
    "generation_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
];

/// A repository revision on a Hugging Face endpoint.
#[derive(Debug, Clone)]
pub struct Repository {
    /// `HF_ENDPOINT`, or https://huggingface.co.
    pub endpoint: Url,
    /// `ORG/NAME`.
    pub name: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Whether a token is sent, for the message of a 401/403.
    pub has_token: bool,
    /// `--gguf-type`: take the repository's `.gguf` file of this type (e.g. `Q4_K_M`).
    pub gguf_type: Option<String>,
}

impl Repository {
    /// Checks `name` is `ORG/NAME` (or a bare `NAME`) without empty or dot segments.
    pub fn new(
        endpoint: Url,
        name: &str,
        revision: &str,
        has_token: bool,
    ) -> Result<Self, FetchError> {
        let segments: Vec<&str> = name.split('/').collect();
        let valid = (1..=2).contains(&segments.len())
            && segments
                .iter()
                .all(|s| !s.is_empty() && *s != "." && *s != "..");
        if !valid || revision.is_empty() {
            return Err(FetchError::InvalidRepository {
                repository: name.to_owned(),
            });
        }
        Ok(Self {
            endpoint,
            name: name.to_owned(),
            revision: revision.to_owned(),
            has_token,
            gguf_type: None,
        })
    }

    /// `{endpoint}/api/models/{repo}/revision/{revision}`.
    pub fn listing_url(&self) -> Url {
        let mut segments = vec!["api", "models"];
        segments.extend(self.name.split('/'));
        segments.extend(["revision", self.revision.as_str()]);
        self.url_with(&segments)
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{file}`.
    pub fn file_url(&self, file: &str) -> Url {
        let mut segments: Vec<&str> = self.name.split('/').collect();
        segments.extend(["resolve", self.revision.as_str()]);
        segments.extend(file.split('/'));
        self.url_with(&segments)
    }

    /// The endpoint with path segments appended, each percent-encoded (a revision such as
    /// `refs/pr/1` becomes one segment).
    fn url_with(&self, add: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(add);
        }
        url
    }

    /// Turns a 401/403/404 into what it means for this repository.
    fn explain(&self, err: FetchError) -> FetchError {
        match err.status() {
            Some(status @ (401 | 403)) if self.has_token => FetchError::GatedTokenLacksAccess {
                repository: self.name.clone(),
                status,
            },
            Some(status @ (401 | 403)) => FetchError::GatedWithoutToken {
                repository: self.name.clone(),
                status,
            },
            Some(404) => FetchError::NotFound {
                repository: self.name.clone(),
                revision: self.revision.clone(),
                endpoint: self.endpoint.to_string(),
            },
            _ => err,
        }
    }

    fn describe(&self) -> String {
        match &self.gguf_type {
            Some(t) => format!("{}@{} ({t})", self.name, self.revision),
            None => format!("{}@{}", self.name, self.revision),
        }
    }
}

/// The part of the model-info answer that lists files.
#[derive(Debug, Deserialize)]
struct ModelInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
}

/// The files to download from a repository holding `files`: with a `gguf_type`, the `.gguf`
/// file(s) of that type, at the top or one directory down (split parts); else the safetensors
/// layout (config, tokenizer, weights and their index) when there are top-level
/// `*.safetensors`; else the one top-level `*.gguf`, or the parts of one split file (several
/// files are refused: a GGUF repository usually holds one per type, and the server serves
/// one). Other sub-directories (such as Meta's `original/`) are never taken.
pub fn select_files(repository: &Repository, files: &[String]) -> Result<Vec<String>, FetchError> {
    let top_level = || {
        files
            .iter()
            .filter(|f| !f.contains('/') && !f.starts_with('.'))
    };
    let gguf = || -> Vec<String> {
        top_level()
            .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
            .cloned()
            .collect()
    };
    if let Some(wanted) = &repository.gguf_type {
        // Large types come split, often in a directory of their own
        // (`NAME-Q8_0/NAME-Q8_0-00001-of-00002.gguf`): files one level down count too.
        let available: Vec<String> = files
            .iter()
            .filter(|f| f.matches('/').count() <= 1 && !f.starts_with('.'))
            .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
            .cloned()
            .collect();
        let of_type: Vec<String> = available
            .iter()
            .filter(|f| names_type(f, wanted))
            .cloned()
            .collect();
        if of_type.is_empty() {
            return Err(FetchError::NoGgufOfType {
                repository: repository.name.clone(),
                revision: repository.revision.clone(),
                wanted: wanted.clone(),
                available: listed(&available),
            });
        }
        return Ok(of_type);
    }
    let has = |name: &str| top_level().any(|f| f == name);
    let safetensors: Vec<String> = top_level()
        .filter(|f| f.ends_with(".safetensors"))
        .cloned()
        .collect();
    if !safetensors.is_empty() {
        let missing: Vec<String> = REQUIRED
            .iter()
            .filter(|name| !has(name))
            .map(|name| (*name).to_owned())
            .collect();
        if !missing.is_empty() {
            return Err(FetchError::MissingFiles {
                repository: repository.name.clone(),
                revision: repository.revision.clone(),
                missing,
            });
        }
        let mut selected: Vec<String> = REQUIRED
            .iter()
            .chain(OPTIONAL.iter())
            .filter(|name| has(name))
            .map(|name| (*name).to_owned())
            .collect();
        selected.extend(safetensors);
        return Ok(selected);
    }
    let gguf = gguf();
    let prefix = |f: &String| crate::engine::gguf::split_prefix(f).map(str::to_owned);
    let one_split_file = gguf.len() > 1
        && prefix(&gguf[0]).is_some()
        && gguf.iter().all(|f| prefix(f) == prefix(&gguf[0]));
    if one_split_file {
        return Ok(gguf);
    }
    match gguf.len() {
        0 => Err(FetchError::NoWeights {
            repository: repository.name.clone(),
            revision: repository.revision.clone(),
        }),
        1 => Ok(gguf),
        count => Err(FetchError::SeveralGguf {
            repository: repository.name.clone(),
            revision: repository.revision.clone(),
            count,
            files: listed(&gguf),
        }),
    }
}

/// Whether file name `name` names weight type `wanted` as one of its words (split at `-`, `.`
/// and spaces, compared without case): `Llama-3.2-1B-Instruct-Q4_K_M.gguf` names `Q4_K_M`.
fn names_type(name: &str, wanted: &str) -> bool {
    let name = name.rsplit('/').next().unwrap_or(name);
    name.split(['-', '.', ' '])
        .any(|word| word.eq_ignore_ascii_case(wanted))
}

/// File names for a message.
fn listed(files: &[String]) -> String {
    if files.is_empty() {
        "none".to_owned()
    } else {
        files.join(", ")
    }
}

/// Lists the revision's files and downloads the selected ones into `out`, one at a time, each
/// through `out/.partial` so that only complete files carry their real names.
pub async fn fetch(
    client: &HttpClient,
    repository: &Repository,
    out: &Path,
) -> Result<Fetched, FetchError> {
    let listing = client
        .get_bytes(&repository.listing_url())
        .await
        .map_err(|e| repository.explain(e))?;
    let info: ModelInfo =
        serde_json::from_slice(&listing).map_err(|source| FetchError::Listing {
            repository: repository.name.clone(),
            revision: repository.revision.clone(),
            source,
        })?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let selected = select_files(repository, &names)?;
    println!(
        "fetch: {} files from {} ({})",
        selected.len(),
        repository.describe(),
        selected.join(", ")
    );
    let partial = out.join(PARTIAL);
    let mut fetched = Fetched::default();
    for file in &selected {
        let downloaded = match client
            .download(&repository.file_url(file), &partial, file)
            .await
        {
            Ok(downloaded) => downloaded,
            Err(err) => {
                // Best effort: the original error matters more than a leftover partial file.
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(repository.explain(err));
            }
        };
        // Saved flat: the server looks for the .gguf file(s) at the top of the directory.
        let dest = out.join(file.rsplit('/').next().unwrap_or(file));
        tokio::fs::rename(&partial, &dest)
            .await
            .map_err(FetchError::io("move the download to", &dest))?;
        fetched.files += 1;
        fetched.bytes += downloaded.bytes;
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(endpoint: &str, revision: &str) -> Repository {
        Repository::new(
            Url::parse(endpoint).expect("endpoint"),
            "meta-llama/Llama-3.2-1B-Instruct",
            revision,
            false,
        )
        .expect("repository")
    }

    fn names(files: &[&str]) -> Vec<String> {
        files.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn urls_follow_the_hub_layout_and_encode_the_revision() {
        let r = repo("https://huggingface.co", "main");
        assert_eq!(
            r.listing_url().as_str(),
            "https://huggingface.co/api/models/meta-llama/Llama-3.2-1B-Instruct/revision/main"
        );
        assert_eq!(
            r.file_url("config.json").as_str(),
            "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct/resolve/main/config.json"
        );
        let mirror = repo("http://mirror:8080/hf/", "refs/pr/1");
        assert_eq!(
            mirror.file_url("config.json").as_str(),
            "http://mirror:8080/hf/meta-llama/Llama-3.2-1B-Instruct/resolve/refs%2Fpr%2F1/config.json"
        );
    }

    #[test]
    fn repository_names_are_org_slash_name() {
        let endpoint = Url::parse("https://huggingface.co").expect("url");
        for bad in ["", "a/b/c", "../x", "org/", "/name"] {
            assert!(
                Repository::new(endpoint.clone(), bad, "main", false).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn safetensors_layout_takes_config_tokenizer_and_shards_only() {
        let files = names(&[
            ".gitattributes",
            "LICENSE.txt",
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "original/consolidated.00.pth",
            "original/params.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]);
        let selected = select_files(&repo("https://h", "main"), &files).expect("selected");
        assert_eq!(
            selected,
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
                "special_tokens_map.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ])
        );
    }

    #[test]
    fn gguf_repositories_give_the_file_of_the_type_asked_for() {
        let files = names(&[
            "README.md",
            "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
            "Llama-3.2-1B-Instruct-Q4_K_S.gguf",
            "Llama-3.2-1B-Instruct-Q8_0.gguf",
            "Llama-3.2-1B-Instruct-Q6_K_L.gguf",
        ]);
        let mut r = repo("https://h", "main");
        // Several files and no type: refused before anything is downloaded, naming them.
        let err = select_files(&r, &files).expect_err("several");
        let message = err.to_string();
        assert!(
            message.contains("4 .gguf files")
                && message.contains("Llama-3.2-1B-Instruct-Q8_0.gguf")
                && message.contains("spec.source.quantization"),
            "{message}"
        );
        r.gguf_type = Some("q4_k_m".into());
        assert_eq!(
            select_files(&r, &files).expect("of the type"),
            names(&["Llama-3.2-1B-Instruct-Q4_K_M.gguf"])
        );
        // Q6_K is not Q6_K_L.
        r.gguf_type = Some("Q6_K".into());
        let err = select_files(&r, &files).expect_err("no Q6_K file");
        let message = err.to_string();
        assert!(
            message.contains("no .gguf file of type Q6_K")
                && message.contains("Llama-3.2-1B-Instruct-Q6_K_L.gguf"),
            "{message}"
        );
        // Split files in a directory of their own.
        let split = names(&[
            "Llama-3.1-70B-Instruct-Q4_K_M.gguf",
            "Llama-3.1-70B-Instruct-Q8_0/Llama-3.1-70B-Instruct-Q8_0-00001-of-00002.gguf",
            "Llama-3.1-70B-Instruct-Q8_0/Llama-3.1-70B-Instruct-Q8_0-00002-of-00002.gguf",
            "deeper/down/Llama-3.1-70B-Instruct-Q8_0.gguf",
        ]);
        r.gguf_type = Some("Q8_0".into());
        assert_eq!(
            select_files(&r, &split).expect("split"),
            split[1..3].to_vec()
        );
        // Nor do the parts of one split file.
        let parts = names(&["x-Q8_0-00001-of-00002.gguf", "x-Q8_0-00002-of-00002.gguf"]);
        assert_eq!(
            select_files(&repo("https://h", "main"), &parts).expect("one split file"),
            parts
        );
        // One file needs no type.
        let one = names(&["README.md", "model.Q8_0.gguf"]);
        assert_eq!(
            select_files(&repo("https://h", "main"), &one).expect("the one"),
            names(&["model.Q8_0.gguf"])
        );
    }

    #[test]
    fn missing_config_or_weights_are_named() {
        let r = repo("https://h", "main");
        let err = select_files(&r, &names(&["model.safetensors", "tokenizer.json"]))
            .expect_err("no config");
        let message = err.to_string();
        assert!(
            message.contains("config.json") && message.contains("tokenizer_config.json"),
            "{message}"
        );
        let err = select_files(&r, &names(&["README.md", "original/model.pth"])).expect_err("none");
        assert!(matches!(err, FetchError::NoWeights { .. }), "{err}");
    }

    #[test]
    fn auth_and_not_found_statuses_explain_themselves() {
        let status = |status| FetchError::Status {
            url: "u".into(),
            status,
        };
        let without = repo("https://h", "main");
        let message = without.explain(status(401)).to_string();
        assert!(
            message.contains("gated") && message.contains("tokenSecretRef"),
            "{message}"
        );
        let with = Repository {
            has_token: true,
            ..without.clone()
        };
        let message = with.explain(status(403)).to_string();
        assert!(message.contains("lacks access"), "{message}");
        let message = without.explain(status(404)).to_string();
        assert!(message.contains("not found"), "{message}");
        assert!(matches!(
            without.explain(status(500)),
            FetchError::Status { .. }
        ));
    }
}
