//! GGUF files beyond their numbers: the metadata carries the configuration and the tokenizer as
//! llama.cpp reads them, broken files give errors that name the file and the fault, and
//! `generate-model --gguf` and the server take GGUF files end to end.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device};
use llama_server::engine::gguf::{GgufFile, check_file_type, llama_config};
use llama_server::engine::{EngineError, LlamaConfig, LlamaModel};
use llama_server::generate_model::ModelShape;
use llama_server::gguf_export::GgufFileType;

use common::gguf::{Metadata, gguf_of, load, rewrite, scratch, set, split, without_tokenizer};
use common::tiny_model;

#[test]
fn metadata_carries_the_configuration_and_the_tokenizer() {
    let dir = tiny_model(ModelShape::TinyUntied, 7);
    let file =
        GgufFile::open(&gguf_of(ModelShape::TinyUntied, 7, GgufFileType::Q8_0)).expect("open");
    let from_gguf = llama_config(&file).expect("config");
    let hf = LlamaConfig::from_file(&dir.join("config.json")).expect("config");
    assert_eq!(
        from_gguf.rms_norm_eps, 1e-5,
        "read as the decimal that was written"
    );
    assert_eq!(
        from_gguf,
        LlamaConfig {
            rope_scaling: None,
            torch_dtype: None,
            // The tokenizer's eos_token (<|eot_id|>), as llama.cpp's converter picks it.
            eos_token_id: Some(llama_server::engine::config::TokenIds::One(128_009)),
            ..hf
        }
    );
    let meta = file.metadata();
    let get = |key: &str| meta.get(key).unwrap_or_else(|| panic!("{key} missing"));
    let string = |key: &str| get(key).to_string().ok().cloned();
    assert_eq!(string("general.architecture").as_deref(), Some("llama"));
    assert_eq!(get("general.file_type").to_u32().ok(), Some(7));
    assert_eq!(string("tokenizer.ggml.model").as_deref(), Some("gpt2"));
    assert_eq!(string("tokenizer.ggml.pre").as_deref(), Some("llama-bpe"));
    let tokens = get("tokenizer.ggml.tokens").to_vec().expect("tokens");
    assert_eq!(tokens.len(), 128_256);
    assert_eq!(
        tokens[128_000].to_string().ok().map(String::as_str),
        Some("<|begin_of_text|>")
    );
    let types = get("tokenizer.ggml.token_type").to_vec().expect("types");
    assert_eq!(types[128_000].to_i32().ok(), Some(3), "control token");
    assert_eq!(types[100].to_i32().ok(), Some(1), "normal token");
    let tokenizer: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tokenizer.json")).expect("tokenizer.json"),
    )
    .expect("json");
    let merges = tokenizer["model"]["merges"]
        .as_array()
        .expect("merges")
        .len();
    assert_eq!(
        get("tokenizer.ggml.merges").to_vec().map(Vec::len).ok(),
        Some(merges)
    );
    assert_eq!(
        get("tokenizer.ggml.bos_token_id").to_u32().ok(),
        Some(128_000)
    );
    assert_eq!(
        get("tokenizer.ggml.add_bos_token").to_bool().ok(),
        Some(true)
    );
    assert!(string("tokenizer.chat_template").is_some());
    assert_eq!(file.shape("rope_freqs.weight").ok(), Some(&[8][..]));
}

#[test]
fn broken_files_give_errors_that_name_the_file_and_the_fault() {
    let out = scratch();
    // Without the 128k-token vocabulary the variants below are quick to write and read.
    let good = out.path().join("lean.gguf");
    rewrite(
        &gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0),
        &good,
        without_tokenizer,
        |_, t| Some(t),
    );
    load(&good);
    let attempt =
        |path: &Path| LlamaModel::load_gguf(path, DType::F32, &Device::Cpu).expect_err("must fail");
    let expect = |err: EngineError, path: &Path, needles: &[&str]| {
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        for needle in needles {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
        println!("{}: {message}", err.label());
    };
    let variant =
        |name: &str, edit: &dyn Fn(&mut Metadata), keep: &dyn Fn(&str) -> bool| -> PathBuf {
            let path = out.path().join(name);
            rewrite(&good, &path, edit, |tensor, t| keep(tensor).then_some(t));
            path
        };
    let garbage = out.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a GGUF file at all").expect("write");
    let err = attempt(&garbage);
    assert!(matches!(err, EngineError::InvalidGguf { .. }), "{err:?}");
    expect(err, &garbage, &["not a GGUF file"]);

    let truncated = out.path().join("truncated.gguf");
    let bytes = std::fs::read(&good).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = attempt(&truncated);
    assert!(matches!(err, EngineError::InvalidGguf { .. }), "{err:?}");
    expect(err, &truncated, &["tensor `"]);

    let qwen = variant(
        "qwen.gguf",
        &set("general.architecture", Value::String("qwen2".into())),
        &|_| true,
    );
    let err = attempt(&qwen);
    assert!(
        matches!(err, EngineError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    expect(err, &qwen, &["qwen2", "only `llama`"]);

    let missing = variant("missing.gguf", &|_| {}, &|name| {
        name != "blk.1.ffn_up.weight"
    });
    let err = attempt(&missing);
    assert!(matches!(err, EngineError::MissingTensor { .. }), "{err:?}");
    expect(err, &missing, &["blk.1.ffn_up.weight"]);

    let reshaped = variant(
        "reshaped.gguf",
        &set("llama.feed_forward_length", Value::U32(96)),
        &|_| true,
    );
    let err = attempt(&reshaped);
    assert!(
        matches!(err, EngineError::TensorShapeMismatch { .. }),
        "{err:?}"
    );
    expect(
        err,
        &reshaped,
        &["blk.0.ffn_gate.weight", "[96, 64]", "[128, 64]"],
    );

    let no_layers = variant(
        "no-layers.gguf",
        &|metadata| metadata.retain(|(key, _)| key != "llama.block_count"),
        &|_| true,
    );
    let err = attempt(&no_layers);
    assert!(matches!(err, EngineError::GgufMetadata { .. }), "{err:?}");
    expect(err, &no_layers, &["llama.block_count", "missing"]);

    let yarn = variant(
        "yarn.gguf",
        &|metadata| {
            metadata.push((
                "llama.rope.scaling.type".into(),
                Value::String("yarn".into()),
            ))
        },
        &|_| true,
    );
    let err = attempt(&yarn);
    assert!(matches!(err, EngineError::GgufMetadata { .. }), "{err:?}");
    expect(err, &yarn, &["llama.rope.scaling.type", "yarn"]);

    // candle's header parser divides by the alignment: zero is a malformed header, not a
    // panic of the loading process.
    let unaligned = variant(
        "unaligned.gguf",
        &|metadata| metadata.push(("general.alignment".into(), Value::U32(0))),
        &|_| true,
    );
    let err = attempt(&unaligned);
    assert!(matches!(err, EngineError::InvalidGguf { .. }), "{err:?}");
    expect(err, &unaligned, &["header is malformed", "divide by zero"]);

    let err = attempt(&out.path().join("absent.gguf"));
    assert!(matches!(err, EngineError::Io { .. }), "{err:?}");
}

/// `generate-model --gguf` writes the file beside the safetensors, and a `.gguf` path loads with
/// the tokenizer files of its directory, as the server does.
#[test]
fn generate_model_writes_gguf_files_the_server_can_load() {
    let out = scratch();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_llama-server"))
        .args([
            "generate-model",
            "--shape",
            "tiny",
            "--seed",
            "5",
            "--gguf",
            "q8_0",
        ])
        .arg("--out")
        .arg(out.path())
        .arg("--tokenizer-dir")
        .arg(common::tokenizer_dir())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run llama-server");
    assert!(status.success());
    let gguf = out.path().join("model-q8_0.gguf");
    assert!(out.path().join("model.safetensors").is_file());
    let model = load(&gguf);
    assert_eq!(model.config().num_hidden_layers, 2);
    let tokenizer = llama_server::tokenizer::LlamaTokenizer::from_dir(gguf.parent().expect("dir"))
        .expect("tokenizer");
    assert!(tokenizer.is_stop(128_009));
}

/// A `.gguf` `modelPath` is served, with the tokenizer files of its directory.
#[tokio::test]
async fn the_server_serves_a_gguf_model_path() {
    use tower::ServiceExt;

    let out = scratch();
    let model = tiny_model(ModelShape::Tiny, 42);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(file), out.path().join(file)).expect("copy tokenizer");
    }
    let gguf = out.path().join("model-q8_0.gguf");
    std::os::unix::fs::symlink(gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0), &gguf)
        .expect("link");
    let state = common::open_server(&format!("modelPath: {}\n", gguf.display())).await;
    let request = axum::http::Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
        ))
        .expect("request");
    let response = llama_server::app(Arc::clone(&state))
        .oneshot(request)
        .await
        .expect("response");
    assert_eq!(response.status(), axum::http::StatusCode::OK);
}

/// `llama-server fetch` saves a URL's `.gguf` file into the model directory with no tokenizer
/// beside it, and the operator points `modelPath` at that directory: with `format: gguf` the
/// server takes the directory's one `.gguf` file and the fallback tokenizer directory.
#[tokio::test]
async fn a_directory_with_one_gguf_file_loads_with_the_fallback_tokenizer() {
    use llama_server::auth::Authenticator;
    use llama_server::server_config::ServerConfig;
    use llama_server::state::AppState;
    use tower::ServiceExt;

    let models = scratch();
    std::os::unix::fs::symlink(
        gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0),
        models.path().join("Llama-3.2-1B-Instruct-Q8_0.gguf"),
    )
    .expect("link");
    assert!(!models.path().join("tokenizer.json").exists());
    let yaml = |tokenizer_dir: &Path| {
        format!(
            "modelPath: {}\nformat: gguf\ntokenizerDir: {}\n",
            models.path().display(),
            tokenizer_dir.display()
        )
    };

    let state = common::open_server(&yaml(&common::tokenizer_dir())).await;
    let request = axum::http::Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
        ))
        .expect("request");
    let response = llama_server::app(Arc::clone(&state))
        .oneshot(request)
        .await
        .expect("response");
    assert_eq!(response.status(), axum::http::StatusCode::OK);

    // Neither beside the file nor in the fallback: the error names both places.
    let empty = scratch();
    let err = AppState::new(
        ServerConfig::from_yaml(&yaml(empty.path())).expect("config"),
        Authenticator::Open,
    )
    .load_engine()
    .expect_err("no tokenizer anywhere");
    assert!(err.contains("no tokenizer for"), "{err}");
    assert!(err.contains(&models.path().display().to_string()), "{err}");
    assert!(err.contains(&empty.path().display().to_string()), "{err}");
}

/// A gguf directory with two `.gguf` files (or none) is refused, naming the directory and the
/// files found.
#[test]
fn a_gguf_directory_must_hold_exactly_one_gguf_file() {
    use llama_server::auth::Authenticator;
    use llama_server::server_config::ServerConfig;
    use llama_server::state::AppState;

    let models = scratch();
    let load = || {
        let config = ServerConfig::from_yaml(&format!(
            "modelPath: {}\nformat: gguf\ntokenizerDir: {}\n",
            models.path().display(),
            common::tokenizer_dir().display()
        ))
        .expect("config");
        AppState::new(config, Authenticator::Open)
            .load_engine()
            .expect_err("not exactly one GGUF file")
    };
    let err = load();
    assert!(err.contains("holds no .gguf file"), "{err}");
    assert!(err.contains(&models.path().display().to_string()), "{err}");

    let gguf = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    for name in ["a-Q8_0.gguf", "b-Q4_K_M.gguf"] {
        std::os::unix::fs::symlink(&gguf, models.path().join(name)).expect("link");
    }
    let err = load();
    assert!(err.contains("holds 2 .gguf files"), "{err}");
    assert!(err.contains("a-Q8_0.gguf, b-Q4_K_M.gguf"), "{err}");
    assert!(err.contains(&models.path().display().to_string()), "{err}");
}

/// The weight type the operator sized a deployment for is checked against the file's
/// `general.file_type`, and a mismatch stops `serve` with both named.
#[test]
fn a_file_of_another_weight_type_than_sized_for_is_refused() {
    let q8 = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q8_0);
    let file = GgufFile::open(&q8).expect("open");
    assert_eq!(llama_server::engine::gguf::file_type(&file), Some("Q8_0"));
    check_file_type(&file, "Q8_0").expect("the type it is");
    let err = check_file_type(&file, "Q4_K_M").expect_err("another type");
    let text = err.to_string();
    for needle in [
        q8.display().to_string().as_str(),
        "general.file_type",
        "the file's weights are Q8_0",
        "sized for Q4_K_M",
        "set spec.source.quantization: Q8_0",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    // A file that names no type cannot be checked, and loads.
    let out = scratch();
    let unnamed = out.path().join("unnamed.gguf");
    rewrite(
        &q8,
        &unnamed,
        |metadata| metadata.retain(|(key, _)| key != "general.file_type"),
        |_, t| Some(t),
    );
    check_file_type(&GgufFile::open(&unnamed).expect("open"), "Q4_K_M").expect("unchecked");

    // `serve` with the operator's `weightType`: it stops before loading, and says why.
    let termination_log = out.path().join("termination-log");
    std::fs::write(&termination_log, "").expect("termination log");
    let config = format!(
        "modelPath: {}\nformat: gguf\nweightType: Q4_K_M\nauth: {{mode: none}}\n",
        q8.display()
    );
    let run = common::serve_until_exit(out.path(), &config, &termination_log);
    assert_eq!(run.status.code(), Some(1));
    let message = std::fs::read_to_string(&termination_log).expect("read");
    assert!(
        message.starts_with("cannot load the model") && message.contains("sized for Q4_K_M"),
        "{message}"
    );
}

/// A file split by llama.cpp's `gguf-split` (large types come so: Hugging Face takes files of
/// at most 50 GB) loads from its first part as the whole file does, and a directory of its
/// parts serves.
#[test]
fn a_split_file_loads_from_its_first_part_as_the_whole_file_does() {
    let whole = gguf_of(ModelShape::TinyUntied, 7, GgufFileType::Q8_0);
    let out = scratch();
    let parts = split(&whole, out.path(), "tiny-Q8_0", 3);
    let file = GgufFile::open(&parts[0]).expect("open the first part");
    assert_eq!(file.part_count(), 3);
    assert_eq!(
        file.tensor_names().count(),
        GgufFile::open(&whole).expect("open").tensor_names().count()
    );
    assert_eq!(
        common::gguf::probe_logits(&load(&parts[0]), 0),
        common::gguf::probe_logits(&load(&whole), 0),
        "the same bytes, the same logits"
    );
    // The model directory `fetch` leaves resolves to the first part.
    assert_eq!(
        llama_server::state::single_gguf_in(out.path()).as_ref(),
        Ok(&parts[0])
    );

    // Opened from a later part, or with a part missing: refused, naming the file.
    let err = LlamaModel::load_gguf(&parts[1], DType::F32, &Device::Cpu).expect_err("part 2");
    assert!(err.to_string().contains("is not the first part"), "{err}");
    std::fs::remove_file(&parts[2]).expect("remove");
    let err = LlamaModel::load_gguf(&parts[0], DType::F32, &Device::Cpu).expect_err("a part gone");
    assert!(matches!(err, EngineError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&parts[2].display().to_string()),
        "{err}"
    );
}
