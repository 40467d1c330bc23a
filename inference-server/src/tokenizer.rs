//! The Llama 3 tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) plus the special tokens
//! and chat template of `tokenizer_config.json`, or the same rebuilt from a GGUF file's
//! `tokenizer.*` metadata.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::engine::error::{EngineError, Result};
use crate::engine::gguf::{GgufFile, embedded_tokenizer};

/// Where a model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A directory with `tokenizer.json` and `tokenizer_config.json`.
    Dir(PathBuf),
    /// The `tokenizer.*` metadata of a GGUF file.
    Gguf(PathBuf),
}

impl std::fmt::Display for TokenizerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.join("tokenizer.json").display()),
            Self::Gguf(path) => write!(f, "the tokenizer metadata of {}", path.display()),
        }
    }
}

/// Tokens that end a Llama 3 turn or document; generation stops when it samples one. The
/// `eos_token_id`s of the model directory's `config.json`/`generation_config.json` are added.
pub const STOP_TOKENS: [&str; 3] = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"];

/// A model's tokenizer with what the engine needs to know about its special tokens.
pub struct LlamaTokenizer {
    inner: Tokenizer,
    bos_token: String,
    eos_token: String,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
    /// What to say when there is no chat template: the file and the key it would come from
    /// (see [`Self::missing_template`]).
    template_place: String,
}

impl std::fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

impl LlamaTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tokenizer_path).map_err(|err| {
            EngineError::Tokenizer(format!("cannot load {}: {err}", tokenizer_path.display()))
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| EngineError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Value =
            serde_json::from_str(&text).map_err(|err| EngineError::InvalidJson {
                path: config_path.clone(),
                reason: err.to_string(),
            })?;
        let token_field = |field: &str| -> Option<String> {
            match config.get(field)? {
                Value::String(token) => Some(token.clone()),
                // Older configs store an AddedToken object.
                Value::Object(token) => token.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        Self::from_parts(
            inner,
            &tokenizer_path,
            token_field("bos_token"),
            token_field("eos_token"),
            model_eos_ids(dir)?,
            chat_template_of(&config),
            format!("{} has no `chat_template`", config_path.display()),
        )
    }

    /// Rebuilds the tokenizer a GGUF file carries in its `tokenizer.*` metadata (see
    /// [`crate::engine::gguf::embedded_tokenizer`]).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        Self::from_gguf_file(&GgufFile::open(path)?)
    }

    /// [`Self::from_gguf`] on a file whose header is already read.
    pub fn from_gguf_file(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let Some(embedded) = embedded_tokenizer(file)? else {
            return Err(EngineError::GgufMetadata {
                path: path.to_owned(),
                key: "tokenizer.ggml.model".into(),
                reason: "missing: the file carries no tokenizer; put tokenizer.json and \
                         tokenizer_config.json beside it"
                    .into(),
            });
        };
        let inner = Tokenizer::from_str(&embedded.tokenizer_json).map_err(|err| {
            EngineError::Tokenizer(format!(
                "cannot build the tokenizer of {} from its metadata: {err}",
                path.display()
            ))
        })?;
        Self::from_parts(
            inner,
            path,
            embedded.bos_token,
            embedded.eos_token,
            embedded.stop_ids,
            embedded.chat_template,
            format!(
                "{} has no `tokenizer.chat_template` metadata (a tokenizer_config.json with a \
                 `chat_template`, beside the file, would give one)",
                path.display()
            ),
        )
    }

    /// Loads the tokenizer `source` names.
    pub fn load(source: &TokenizerSource) -> Result<Self> {
        match source {
            TokenizerSource::Dir(dir) => Self::from_dir(dir),
            TokenizerSource::Gguf(path) => Self::from_gguf(path),
        }
    }

    /// The special tokens (Llama 3's names where the source names none), the stop ids (the
    /// named stop tokens, the EOS token and `model_stop_ids`) and the chat template, or what
    /// says where it is missing (`template_place`).
    fn from_parts(
        inner: Tokenizer,
        source: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
        model_stop_ids: Vec<u32>,
        chat_template: Option<String>,
        template_place: String,
    ) -> Result<Self> {
        let bos_token = bos_token.unwrap_or_else(|| "<|begin_of_text|>".into());
        let eos_token = eos_token.unwrap_or_else(|| "<|eot_id|>".into());
        let mut stop_ids: Vec<u32> = STOP_TOKENS
            .iter()
            .chain(std::iter::once(&eos_token.as_str()))
            .filter_map(|token| inner.token_to_id(token))
            .collect();
        // The model's own end-of-sequence ids count too: some tokenizer files name id 128008
        // `<|reserved_special_token_4|>` although Llama 3.1 models emit it as `<|eom_id|>`.
        stop_ids.extend(model_stop_ids);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        if stop_ids.is_empty() {
            return Err(EngineError::Tokenizer(format!(
                "{} defines none of the stop tokens {STOP_TOKENS:?}",
                source.display()
            )));
        }
        Ok(Self {
            inner,
            bos_token,
            eos_token,
            stop_ids,
            chat_template,
            template_place,
        })
    }

    /// Token ids of `text`. Chat prompts are rendered with their special tokens already in the
    /// text, so they are encoded with `add_special_tokens = false` (as `apply_chat_template` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| EngineError::Tokenizer(format!("cannot encode text: {err}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| EngineError::Tokenizer(format!("cannot decode tokens: {err}")))
    }

    /// A streaming decoder that yields text only once it forms whole characters.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Whether sampling `id` ends the completion.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The ids of the stop tokens.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The Jinja chat template (`tokenizer_config.json`'s, or a GGUF file's
    /// `tokenizer.chat_template`), if there is one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Where the chat template was looked for, when there is none: the file and the key.
    pub fn missing_template(&self) -> &str {
        &self.template_place
    }
}

/// `eos_token_id` of `generation_config.json` and `config.json`, where the directory has them.
fn model_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let config: Value =
            serde_json::from_str(&text).map_err(|err| EngineError::InvalidJson {
                path: path.clone(),
                reason: err.to_string(),
            })?;
        match config.get("eos_token_id") {
            Some(Value::Number(id)) => ids.extend(id.as_u64().map(|id| id as u32)),
            Some(Value::Array(list)) => {
                ids.extend(list.iter().filter_map(Value::as_u64).map(|id| id as u32))
            }
            _ => {}
        }
    }
    Ok(ids)
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Incremental detokenization: emits only text that is complete (a multi-byte character split
/// over tokens is held back until whole). Special tokens are skipped unless asked otherwise. Decodes a short window
/// of recent tokens per step, not the whole completion.
pub struct TextStream<'a> {
    tokenizer: &'a LlamaTokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window whose text was already handed out in part.
    prefix: usize,
    /// End of the text already handed out.
    read: usize,
}

impl std::fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStream")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

impl TextStream<'_> {
    /// Adds one token and returns the new complete text, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let seen = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let all = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for more tokens.
        if all.len() <= seen.len() || all.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = all.get(seen.len()..) else {
            return Ok(String::new());
        };
        let new = new.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }
}
