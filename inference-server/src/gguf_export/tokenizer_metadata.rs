//! The `tokenizer.*` metadata that lets llama.cpp tokenize with a GGUF file alone, built from
//! `tokenizer.json` and `tokenizer_config.json` the way `convert_hf_to_gguf.py` does for Llama 3
//! (a byte-level BPE model: `gpt2` with the `llama-bpe` pre-tokenizer).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::engine::error::{EngineError, Result};

/// llama.cpp's token types (`gguf.TokenType`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Metadata entries for a vocabulary of `vocab_size` ids (the rows of the embedding table).
/// `eos_fallback` is the model's first `eos_token_id`, used when `tokenizer_config.json` names
/// no `eos_token`.
pub fn tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    eos_fallback: Option<u32>,
) -> Result<Vec<(String, Value)>> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = read_json(&tokenizer_path)?;
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let invalid = |reason: String| EngineError::InvalidJson {
        path: tokenizer_path.clone(),
        reason,
    };

    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        return Err(invalid(format!(
            "model.type is {}, only byte-level BPE (Llama 3) is exported to GGUF",
            model["type"]
        )));
    }
    // id → (text, type)
    let mut entries: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: u64, text: &str, kind: i32| -> Result<()> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|id| entries.get_mut(id))
            .ok_or_else(|| {
                invalid(format!(
                    "token {text:?} has id {id}, outside the model's {vocab_size} embeddings"
                ))
            })?;
        *slot = Some((text.to_owned(), kind));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid("model.vocab is not an object".into()))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| invalid(format!("model.vocab[{text:?}] is not an id")))?;
        place(id, text, NORMAL)?;
    }
    let added = tokenizer["added_tokens"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut ids_by_text = HashMap::new();
    for token in added {
        let (Some(id), Some(text)) = (token["id"].as_u64(), token["content"].as_str()) else {
            return Err(invalid(format!(
                "added token {token} lacks an id or content"
            )));
        };
        let kind = if token["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id, text, kind)?;
        ids_by_text.insert(text.to_owned(), id);
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = entries
        .into_iter()
        .enumerate()
        .map(|(id, entry)| {
            let (text, kind) = entry.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
            (Value::String(text), Value::I32(kind))
        })
        .unzip();

    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| invalid("model.merges is not a list".into()))?
        .iter()
        .map(|merge| match merge {
            Json::String(pair) => Ok(Value::String(pair.clone())),
            // Newer tokenizer.json files store a merge as a pair.
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(invalid(format!("merge {merge} is not a pair of strings"))),
            },
            other => Err(invalid(format!("merge {other} is not a string"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let token_id = |field: &str| -> Option<u32> {
        let text = match &config[field] {
            Json::String(text) => text.as_str(),
            Json::Object(token) => token.get("content")?.as_str()?,
            _ => return None,
        };
        ids_by_text
            .get(text)
            .copied()
            .or_else(|| vocab.get(text)?.as_u64())
            .and_then(|id| u32::try_from(id).ok())
    };
    let bos = token_id("bos_token");
    let eos = token_id("eos_token").or(eos_fallback);

    let mut metadata = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            Value::String("llama-bpe".into()),
        ),
        ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_owned(), Value::Array(merges)),
    ];
    if let Some(bos) = bos {
        metadata.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
        metadata.push((
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(prepends_bos(&tokenizer["post_processor"], bos)),
        ));
    }
    if let Some(eos) = eos {
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(template) = config["chat_template"].as_str() {
        metadata.push((
            "tokenizer.chat_template".into(),
            Value::String(template.to_owned()),
        ));
    }
    Ok(metadata)
}

/// Whether the tokenizer's post-processor puts BOS (`bos`) in front of a single sequence, as
/// Llama 3's `TemplateProcessing` does.
fn prepends_bos(processor: &Json, bos: u32) -> bool {
    match processor["type"].as_str() {
        Some("Sequence") => processor["processors"]
            .as_array()
            .is_some_and(|all| all.iter().any(|p| prepends_bos(p, bos))),
        Some("TemplateProcessing") => {
            let first = &processor["single"][0]["SpecialToken"]["id"];
            first.as_str().is_some_and(|name| {
                processor["special_tokens"][name]["ids"]
                    .as_array()
                    .is_some_and(|ids| ids.first().and_then(Json::as_u64) == Some(u64::from(bos)))
            })
        }
        _ => false,
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| EngineError::InvalidJson {
        path: path.to_owned(),
        reason: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tokenizer(dir: &Path) {
        let tokenizer = serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                      "merges": ["a b", ["ab", "b"]]},
            "added_tokens": [
                {"id": 4, "content": "<|begin_of_text|>", "special": true},
                {"id": 5, "content": "<tool>", "special": false},
            ],
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel"},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "special_tokens": {"<|begin_of_text|>": {"ids": [4]}}},
            ]},
        });
        let config =
            serde_json::json!({"bos_token": "<|begin_of_text|>", "chat_template": "{{x}}"});
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write");
    }

    fn get<'a>(metadata: &'a [(String, Value)], key: &str) -> &'a Value {
        &metadata.iter().find(|(k, _)| k == key).expect(key).1
    }

    #[test]
    fn vocabulary_types_merges_and_special_ids() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tokenizer(dir.path());
        let metadata = tokenizer_metadata(dir.path(), 7, Some(6))?;
        let strings = |key| -> Vec<String> {
            get(&metadata, key)
                .to_vec()
                .expect("array")
                .iter()
                .map(|v| v.to_string().expect("string").clone())
                .collect()
        };
        assert_eq!(
            strings("tokenizer.ggml.tokens"),
            [
                "a",
                "b",
                "ab",
                "[PAD3]",
                "<|begin_of_text|>",
                "<tool>",
                "[PAD6]"
            ]
        );
        let types: Vec<i32> = get(&metadata, "tokenizer.ggml.token_type")
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_i32().expect("i32"))
            .collect();
        assert_eq!(types, [1, 1, 1, 5, 3, 4, 5]);
        assert_eq!(strings("tokenizer.ggml.merges"), ["a b", "ab b"]);
        assert_eq!(
            get(&metadata, "tokenizer.ggml.bos_token_id").to_u32().ok(),
            Some(4)
        );
        assert_eq!(
            get(&metadata, "tokenizer.ggml.eos_token_id").to_u32().ok(),
            Some(6)
        );
        assert_eq!(
            get(&metadata, "tokenizer.ggml.add_bos_token")
                .to_bool()
                .ok(),
            Some(true)
        );
        Ok(())
    }

    #[test]
    fn ids_beyond_the_embeddings_are_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tokenizer(dir.path());
        let err = tokenizer_metadata(dir.path(), 5, None).expect_err("id 5 does not fit");
        assert!(err.to_string().contains("<tool>"), "{err}");
    }
}
