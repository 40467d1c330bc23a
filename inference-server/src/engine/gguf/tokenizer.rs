//! The tokenizer a GGUF file carries in its `tokenizer.*` metadata, rebuilt as the
//! `tokenizer.json` it came from, so that a single `.gguf` file serves with its own vocabulary,
//! special tokens and chat template.
//!
//! This reads what llama.cpp's converter writes for a Llama 3 (byte-level BPE) tokenizer, and
//! what `generate-model --gguf` writes (`gguf_export::tokenizer_metadata`): the model `gpt2`
//! with the `llama-bpe` pre-tokenizer, every token with its type (normal tokens form the BPE
//! vocabulary, control and user-defined ones are added tokens), the merges, the BOS and EOS
//! ids and the chat template. Other tokenizer models are refused with the key that names them.

use candle_core::quantized::gguf_file::Value;
use serde_json::{Map, Value as Json, json};

use super::file::GgufFile;
use super::metadata::Metadata;
use crate::engine::error::Result;

/// llama.cpp's names for Llama 3's pre-tokenizer.
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "llama-v3"];

/// Llama 3's pre-tokenizer split pattern, as in its `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// A tokenizer rebuilt from GGUF metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The equivalent `tokenizer.json`, for `tokenizers::Tokenizer::from_str`.
    pub tokenizer_json: String,
    /// The text of `tokenizer.ggml.bos_token_id`.
    pub bos_token: Option<String>,
    /// The text of `tokenizer.ggml.eos_token_id`.
    pub eos_token: Option<String>,
    /// The ids that end generation by the metadata: EOS, EOT and EOM where present.
    pub stop_ids: Vec<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Whether `file` carries a tokenizer at all (`tokenizer.ggml.model`).
pub fn has_tokenizer(file: &GgufFile) -> bool {
    file.metadata().contains_key("tokenizer.ggml.model")
}

/// The tokenizer of `file`; `None` when it carries none. Errors name the file and the key.
pub fn embedded_tokenizer(file: &GgufFile) -> Result<Option<GgufTokenizer>> {
    let meta = Metadata { file };
    let Some(model) = meta.optional_string("tokenizer.ggml.model")? else {
        return Ok(None);
    };
    let beside = "put the model's tokenizer.json and tokenizer_config.json beside the file";
    if model != "gpt2" {
        return Err(meta.error(
            "tokenizer.ggml.model",
            format!(
                "tokenizer model {model:?} cannot be rebuilt: llama-server reads byte-level BPE \
                 (`gpt2`, Llama 3) tokenizers from GGUF; {beside}"
            ),
        ));
    }
    match meta.optional_string("tokenizer.ggml.pre")? {
        Some(pre) if !LLAMA3_PRE.contains(&pre) => {
            return Err(meta.error(
                "tokenizer.ggml.pre",
                format!("pre-tokenizer {pre:?} is not Llama 3's (one of {LLAMA3_PRE:?}); {beside}"),
            ));
        }
        Some(_) => {}
        None => tracing::warn!(
            path = %file.path().display(),
            "GGUF metadata names no tokenizer.ggml.pre: using Llama 3's pre-tokenizer"
        ),
    }

    let texts = strings(&meta, "tokenizer.ggml.tokens")?;
    let types = match meta.optional_array("tokenizer.ggml.token_type")? {
        None => vec![NORMAL; texts.len()],
        Some(values) => {
            if values.len() != texts.len() {
                return Err(meta.error(
                    "tokenizer.ggml.token_type",
                    format!(
                        "{} types for {} tokens (tokenizer.ggml.tokens)",
                        values.len(),
                        texts.len()
                    ),
                ));
            }
            values
                .iter()
                .map(|v| {
                    v.to_i32().map_err(|_| {
                        meta.error(
                            "tokenizer.ggml.token_type",
                            format!("expected 32-bit integers, found a {:?}", v.value_type()),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    let merges = strings(&meta, "tokenizer.ggml.merges")?;
    if let Some(bad) = merges.iter().position(|m| m.split(' ').count() != 2) {
        return Err(meta.error(
            "tokenizer.ggml.merges",
            format!(
                "merge {bad} ({:?}) is not two tokens and a space",
                merges[bad]
            ),
        ));
    }

    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (text, &kind)) in texts.iter().zip(&types).enumerate() {
        match kind {
            CONTROL | USER_DEFINED => added.push(json!({
                "id": id,
                "content": text,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": kind == CONTROL,
            })),
            UNUSED => {}
            _ => {
                vocab.insert((*text).to_owned(), json!(id));
            }
        }
    }

    let token_at = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(id) = meta.optional_count(key)? else {
            return Ok(None);
        };
        let text = texts.get(id).ok_or_else(|| {
            meta.error(key, format!("id {id} is past the {} tokens", texts.len()))
        })?;
        let id = u32::try_from(id).map_err(|_| meta.error(key, "not a token id"))?;
        Ok(Some((id, (*text).to_owned())))
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        stop_ids.extend(token_at(key)?.map(|(id, _)| id));
    }
    let add_bos = match file.metadata().get("tokenizer.ggml.add_bos_token") {
        None => true,
        Some(value) => value.to_bool().map_err(|_| {
            meta.error(
                "tokenizer.ggml.add_bos_token",
                format!("expected a bool, found a {:?}", value.value_type()),
            )
        })?,
    };

    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true
    });
    let post_processor = match &bos {
        Some((id, text)) if add_bos => json!({
            "type": "Sequence",
            "processors": [byte_level, {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": text, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}
                ],
                "pair": [
                    {"SpecialToken": {"id": text, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": text, "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}}
                ],
                "special_tokens": {text.clone(): {"id": text, "ids": [id], "tokens": [text]}}
            }]
        }),
        _ => byte_level,
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT},
                    "behavior": "Isolated",
                    "invert": false
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": true,
                    "use_regex": false
                }
            ]
        },
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": Json::Object(vocab),
            "merges": merges,
        }
    });
    Ok(Some(GgufTokenizer {
        tokenizer_json: tokenizer.to_string(),
        bos_token: bos.map(|(_, text)| text),
        eos_token: eos.map(|(_, text)| text),
        stop_ids,
        chat_template: meta
            .optional_string("tokenizer.chat_template")?
            .map(str::to_owned),
    }))
}

/// An array of strings, required.
fn strings<'a>(meta: &Metadata<'a>, key: &str) -> Result<Vec<&'a str>> {
    let values = meta
        .optional_array(key)?
        .ok_or_else(|| meta.error(key, "missing"))?;
    values
        .iter()
        .enumerate()
        .map(|(i, value)| match value {
            Value::String(text) => Ok(text.as_str()),
            other => Err(meta.error(
                key,
                format!("entry {i} is a {:?}, not a string", other.value_type()),
            )),
        })
        .collect()
}
