//! The tokenizer a GGUF file carries: rebuilt from its `tokenizer.*` metadata it encodes,
//! decodes and templates exactly as the `tokenizer.json` it was written from; a server given a
//! `.gguf` file alone serves with it; metadata it cannot rebuild is refused, naming the key.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use llama_server::chat_template::ChatTemplate;
use llama_server::engine::EngineError;
use llama_server::generate_model::ModelShape;
use llama_server::gguf_export::GgufFileType;
use llama_server::rng::SplitMix64;
use llama_server::state::tokenizer_source_for;
use llama_server::tokenizer::{LlamaTokenizer, TokenizerSource};

use common::gguf::{Metadata, gguf_of, rewrite, scratch, set, without_tokenizer};
use common::tiny_model;

/// Text that exercises every branch of Llama 3's split pattern and the special tokens.
const CORPUS: [&str; 12] = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'll've they're we'd it's YOU'RE  DON'T",
    "fn main() {\n\tlet x = 12345678 + 0.5e-3;\n\tprintln!(\"{x:?}\");\n}\n",
    "naïve café — 東京タワー, Привет мир, مرحبا 🙂🦙👩‍👩‍👧",
    "   leading spaces,\ttabs\t\tand\r\nwindows lines\n\n\n   trailing   ",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "a<|reserved_special_token_5|>b<|eom_id|>c<|python_tag|>",
    "1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "https://example.com/path?query=1&b=2#frag user@mail.example",
    "",
    " ",
    "ßẞǅ\u{0301}e\u{0301} \u{00a0}nbsp \u{200b}zero-width",
];

#[test]
fn the_tokenizer_in_gguf_metadata_matches_the_files_it_was_written_from() {
    let files = LlamaTokenizer::from_dir(&tiny_model(ModelShape::Tiny, 42)).expect("files");
    let gguf = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    let meta = LlamaTokenizer::from_gguf(&gguf).expect("metadata");

    assert_eq!(meta.vocab_size(), files.vocab_size());
    assert_eq!(meta.bos_token(), files.bos_token());
    assert_eq!(meta.eos_token(), files.eos_token());
    assert_eq!(meta.chat_template(), files.chat_template());
    assert!(meta.chat_template().is_some());
    // The named stop tokens and EOS. (The files add config.json's `eos_token_id`s, which a
    // GGUF file does not carry: 128008, named `<|eom_id|>` in real Llama 3.1 tokenizers.)
    for id in meta.stop_ids() {
        assert!(
            files.stop_ids().contains(id),
            "{id} stops only in the GGUF tokenizer"
        );
    }
    for id in [128_001, 128_009] {
        assert!(meta.is_stop(id), "{id}");
    }

    let mut ids_seen = Vec::new();
    for text in CORPUS {
        for special in [false, true] {
            let want = files.encode(text, special).expect("encode");
            assert_eq!(
                meta.encode(text, special).expect("encode"),
                want,
                "{text:?}, special tokens {special}"
            );
            ids_seen.extend(want);
        }
    }
    // Decoding: the corpus's tokens, and random ids over the whole vocabulary (special ones
    // included), with and without special tokens.
    let mut rng = SplitMix64::new(7);
    let vocab = files.vocab_size() as u64;
    let mut sequences = vec![ids_seen];
    for _ in 0..64 {
        sequences.push((0..24).map(|_| (rng.next_u64() % vocab) as u32).collect());
    }
    for ids in &sequences {
        for skip in [false, true] {
            assert_eq!(
                meta.decode(ids, skip).expect("decode"),
                files.decode(ids, skip).expect("decode"),
                "{ids:?}"
            );
        }
    }
}

/// A `.gguf` file with no tokenizer beside it and none configured serves chat with the
/// tokenizer and chat template of its own metadata: the same answer, token for token, as with
/// the tokenizer files beside it.
#[tokio::test]
async fn a_gguf_file_alone_serves_with_its_own_tokenizer() {
    let file = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    let alone = scratch();
    let gguf = alone.path().join("model-q8_0.gguf");
    std::os::unix::fs::symlink(&file, &gguf).expect("link");
    assert_eq!(
        tokenizer_source_for(&gguf, None, None),
        Ok(TokenizerSource::Gguf(gguf.clone()))
    );
    let with_files = scratch();
    let model = tiny_model(ModelShape::Tiny, 42);
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(name), with_files.path().join(name)).expect("copy tokenizer");
    }
    std::os::unix::fs::symlink(&file, with_files.path().join("model-q8_0.gguf")).expect("link");

    let body = r#"{"messages":[{"role":"system","content":"Answer in French."},
        {"role":"user","content":"Hello there, naïve café 🙂"}],
        "max_tokens":12,"temperature":0,"logprobs":true,"top_logprobs":2}"#;
    let alone = chat(alone.path(), body).await;
    let beside = chat(with_files.path(), body).await;
    assert_eq!(alone["usage"], beside["usage"]);
    assert_eq!(alone["choices"], beside["choices"]);
    assert!(
        alone["usage"]["prompt_tokens"].as_u64() > Some(20),
        "{alone}"
    );
    assert_eq!(alone["usage"]["completion_tokens"], 12, "{alone}");
}

/// The answer of a server on the one `.gguf` file in `dir` to a chat request.
async fn chat(dir: &Path, body: &str) -> serde_json::Value {
    let state = common::open_server(&format!("modelPath: {}\nformat: gguf\n", dir.display())).await;
    let request = axum::http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_owned()))
        .expect("request");
    let (status, body) = common::send(&state, request).await;
    assert_eq!(status, axum::http::StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Where each tokenizer comes from, in order: beside the file, `tokenizerDir`, the file's
/// metadata, the bundled directory.
#[test]
fn the_tokenizer_beside_a_gguf_file_or_configured_wins_over_its_metadata() {
    let with_tokenizer = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    let out = scratch();
    let lean = out.path().join("lean.gguf");
    rewrite(&with_tokenizer, &lean, without_tokenizer, |_, t| Some(t));
    let bundled = common::tokenizer_dir();
    let dir = |path: &Path| Ok(TokenizerSource::Dir(path.to_path_buf()));

    // Metadata, unless a directory is configured; the bundled one only without metadata.
    let alone = scratch();
    let file = alone.path().join("m.gguf");
    std::os::unix::fs::symlink(&with_tokenizer, &file).expect("link");
    assert_eq!(
        tokenizer_source_for(&file, None, Some(&bundled)),
        Ok(TokenizerSource::Gguf(file.clone()))
    );
    assert_eq!(
        tokenizer_source_for(&file, Some(&bundled), None),
        dir(&bundled)
    );
    assert_eq!(
        tokenizer_source_for(&lean, None, Some(&bundled)),
        dir(&bundled)
    );
    let err = tokenizer_source_for(&lean, None, None).expect_err("no tokenizer anywhere");
    assert!(err.contains("carries no tokenizer metadata"), "{err}");
    assert!(err.contains(&lean.display().to_string()), "{err}");

    // Files beside the model come first.
    let beside = scratch();
    let file = beside.path().join("m.gguf");
    std::os::unix::fs::symlink(&with_tokenizer, &file).expect("link");
    std::fs::copy(
        bundled.join("tokenizer.json"),
        beside.path().join("tokenizer.json"),
    )
    .expect("copy");
    assert_eq!(
        tokenizer_source_for(&file, Some(&bundled), Some(&bundled)),
        dir(beside.path())
    );
}

#[test]
fn tokenizer_metadata_that_cannot_be_rebuilt_is_refused_naming_the_key() {
    let good = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    let out = scratch();
    let attempt = |name: &str, edit: &dyn Fn(&mut Metadata)| -> String {
        let path = out.path().join(name);
        rewrite(&good, &path, edit, |_, t| Some(t));
        let err = LlamaTokenizer::from_gguf(&path).expect_err("must fail");
        assert!(matches!(err, EngineError::GgufMetadata { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        message
    };
    let message = attempt(
        "spm.gguf",
        &set("tokenizer.ggml.model", Value::String("llama".into())),
    );
    assert!(message.contains("`tokenizer.ggml.model`"), "{message}");
    assert!(message.contains("\"llama\""), "{message}");
    assert!(message.contains("tokenizer.json"), "{message}");

    let message = attempt(
        "qwen-pre.gguf",
        &set("tokenizer.ggml.pre", Value::String("qwen2".into())),
    );
    assert!(message.contains("`tokenizer.ggml.pre`"), "{message}");

    let message = attempt(
        "types.gguf",
        &set(
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1)]),
        ),
    );
    assert!(message.contains("`tokenizer.ggml.token_type`"), "{message}");
    assert!(message.contains("1 types for"), "{message}");

    let message = attempt(
        "merges.gguf",
        &set(
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("nospace".into())]),
        ),
    );
    assert!(message.contains("`tokenizer.ggml.merges`"), "{message}");

    let message = attempt(
        "bos.gguf",
        &set("tokenizer.ggml.bos_token_id", Value::U32(1 << 30)),
    );
    assert!(
        message.contains("`tokenizer.ggml.bos_token_id`"),
        "{message}"
    );

    let message = attempt("none.gguf", &without_tokenizer);
    assert!(message.contains("carries no tokenizer"), "{message}");

    // No chat template: the tokenizer loads, chat is refused naming the key.
    let path = out.path().join("no-template.gguf");
    rewrite(
        &good,
        &path,
        |metadata| metadata.retain(|(key, _)| key != "tokenizer.chat_template"),
        |_, t| Some(t),
    );
    let tokenizer = LlamaTokenizer::from_gguf(&path).expect("tokenizer still loads");
    assert_eq!(tokenizer.chat_template(), None);
    let err = ChatTemplate::from_tokenizer(&tokenizer).expect_err("no template");
    let message = err.to_string();
    assert!(message.contains("`tokenizer.chat_template`"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}
