//! Loading models: sharded checkpoints, and clear errors for broken model directories.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llama_server::chat_template::ChatTemplate;
use llama_server::engine::{EngineError, LlamaModel, LogitsFor, SequenceStep};
use llama_server::generate_model::ModelShape;
use llama_server::tokenizer::LlamaTokenizer;

use common::tiny_model;

/// A directory under the target's temporary folder, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("scratch")
            .join(format!("{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scratch copy of the tiny model: links to its files, `config.json` copied so it can be edited.
fn scratch(name: &str) -> Scratch {
    let source = tiny_model(ModelShape::Tiny, 42);
    let dir = Scratch::new(name);
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::os::unix::fs::symlink(source.join(file), dir.join(file)).expect("link");
    }
    std::fs::copy(source.join("config.json"), dir.join("config.json")).expect("copy config");
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(&path, config.to_string()).expect("write");
}

fn load(dir: &Path) -> Result<LlamaModel, EngineError> {
    LlamaModel::load(dir, DType::F32, &Device::Cpu)
}

fn logits_of(model: &LlamaModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    model
        .forward(&mut [SequenceStep {
            tokens,
            cache: &mut cache,
            logits: LogitsFor::All,
        }])
        .expect("forward")[0]
        .to_vec2()
        .expect("logits")
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let single = tiny_model(ModelShape::Tiny, 42);
    let dir = scratch("sharded");
    std::fs::remove_file(dir.join("model.safetensors")).expect("unlink");
    let tensors = candle_core::safetensors::load(single.join("model.safetensors"), &Device::Cpu)
        .expect("load single file");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|&n| (n.clone(), tensors[n].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.join(shard)).expect("save shard");
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");

    let tokens = [128_000u32, 791, 6864, 315, 9822, 374];
    let sharded = load(&dir).expect("sharded loads");
    let whole = load(&single).expect("single loads");
    assert_eq!(logits_of(&sharded, &tokens), logits_of(&whole, &tokens));
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch("more-layers");
    edit_config(&dir, |c| c["num_hidden_layers"] = 3.into());
    let err = load(&dir).expect_err("layer 2 is missing");
    assert!(matches!(err, EngineError::MissingTensor { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("model.layers.2.input_layernorm.weight"),
        "{message}"
    );
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn untied_config_on_tied_weights_reports_lm_head() {
    let dir = scratch("untied");
    edit_config(&dir, |c| c["tie_word_embeddings"] = false.into());
    let err = load(&dir).expect_err("no lm_head");
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}

#[test]
fn shape_mismatch_names_tensor_and_shapes() {
    let dir = scratch("wider");
    edit_config(&dir, |c| c["intermediate_size"] = 256.into());
    let err = load(&dir).expect_err("shape mismatch");
    let message = err.to_string();
    assert!(
        matches!(err, EngineError::TensorShapeMismatch { .. }),
        "{err:?}"
    );
    assert!(
        message.contains("mlp.gate_proj.weight")
            && message.contains("[128, 64]")
            && message.contains("[256, 64]"),
        "{message}"
    );
}

#[test]
fn corrupt_and_missing_files_are_reported_with_their_path() {
    let dir = scratch("corrupt");
    let weights = dir.join("model.safetensors");
    std::fs::remove_file(&weights).expect("unlink");
    let original =
        std::fs::read(tiny_model(ModelShape::Tiny, 42).join("model.safetensors")).expect("read");
    std::fs::write(&weights, &original[..original.len() / 2]).expect("truncate");
    let err = load(&dir).expect_err("truncated");
    assert!(matches!(err, EngineError::CorruptWeights { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&weights, b"not a safetensors file").expect("garbage");
    assert!(matches!(
        load(&dir),
        Err(EngineError::CorruptWeights { .. })
    ));

    std::fs::remove_file(&weights).expect("unlink");
    let err = load(&dir).expect_err("no weights");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(dir.join("config.json"), "{ not json").expect("garbage config");
    let err = load(&dir).expect_err("bad config");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn bad_model_inputs_are_errors_not_panics() {
    let model = load(&tiny_model(ModelShape::Tiny, 42)).expect("loads");
    let mut cache = model.new_cache();
    let mut run = |tokens: &[u32]| {
        model.forward(&mut [SequenceStep {
            tokens,
            cache: &mut cache,
            logits: LogitsFor::Last,
        }])
    };
    assert!(matches!(run(&[]), Err(EngineError::InvalidInput(_))));
    assert!(matches!(run(&[128_256]), Err(EngineError::InvalidInput(_))));
    let too_long = vec![1u32; model.context_length() + 1];
    assert!(matches!(
        run(&too_long),
        Err(EngineError::PromptTooLong { .. })
    ));
    assert!(model.forward(&mut []).is_err());
    assert!(
        cache.is_empty(),
        "rejected input leaves the cache untouched"
    );
}

#[test]
fn tokenizer_without_chat_template_is_a_clear_error() {
    let dir = scratch("no-template");
    let config_path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read")).expect("json");
    config
        .as_object_mut()
        .expect("object")
        .remove("chat_template");
    std::fs::remove_file(&config_path).expect("unlink");
    std::fs::write(&config_path, config.to_string()).expect("write");
    let tokenizer = LlamaTokenizer::from_dir(&dir).expect("tokenizer still loads");
    let err = ChatTemplate::from_tokenizer(&tokenizer).expect_err("no template");
    assert!(err.to_string().contains("no `chat_template`"), "{err}");
    assert!(
        err.to_string().contains(&config_path.display().to_string()),
        "{err}"
    );
}

#[test]
fn chat_template_features_render_like_transformers() {
    let golden = common::golden("chat-template-features.json");
    let template = ChatTemplate::new(
        golden["template"].as_str().expect("template"),
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    .expect("compiles");
    for case in golden["cases"].as_array().expect("cases") {
        let tools = case.get("tools").filter(|t| !t.is_null());
        let rendered = template
            .render_json(
                &case["messages"],
                tools,
                case["add_generation_prompt"].as_bool().expect("bool"),
            )
            .expect("renders");
        assert_eq!(
            rendered,
            case["rendered"].as_str().expect("rendered"),
            "{}",
            case["name"]
        );
    }
    let too_many =
        serde_json::Value::Array(vec![serde_json::json!({"role": "user", "content": "x"}); 7]);
    let err = template
        .render_json(&too_many, None, true)
        .expect_err("raises");
    assert!(err.to_string().contains("too many messages"), "{err}");
}

#[test]
fn bf16_compute_and_bf16_files_stay_close_to_f32() {
    use llama_server::generate_model::{GenerateModel, WeightDtype};
    let f32_dir = tiny_model(ModelShape::Tiny, 42);
    let tokens = [128_000u32, 791, 6864, 315, 9822, 374];
    let reference = logits_of(&load(&f32_dir).expect("loads"), &tokens);

    let bf16_compute = LlamaModel::load(&f32_dir, DType::BF16, &Device::Cpu).expect("loads");
    assert_eq!(bf16_compute.dtype(), DType::BF16);
    let bf16_dir = Scratch::new("bf16-file");
    GenerateModel {
        shape: ModelShape::Tiny,
        seed: 42,
        out: bf16_dir.to_path_buf(),
        tokenizer_dir: common::tokenizer_dir(),
        dtype: WeightDtype::Bf16,
    }
    .run()
    .expect("generates");
    let bf16_file = load(&bf16_dir).expect("bf16 file loads as f32");
    for model in [&bf16_compute, &bf16_file] {
        let logits = logits_of(model, &tokens);
        let worst = logits
            .iter()
            .flatten()
            .zip(reference.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst.is_finite() && worst < 0.05,
            "worst difference {worst}"
        );
        assert!(worst > 0.0, "bf16 rounding must show somewhere");
    }
}

#[test]
fn generate_model_binary_writes_a_model_and_fails_cleanly() {
    let out = Scratch::new("cli");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_llama-server"))
        .args(["generate-model", "--shape", "tiny", "--seed", "3", "--out"])
        .arg(&*out)
        .arg("--tokenizer-dir")
        .arg(common::tokenizer_dir())
        .output()
        .expect("runs");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let model = load(&out).expect("loads");
    assert!(model.config().tie_word_embeddings);

    let failed = std::process::Command::new(env!("CARGO_BIN_EXE_llama-server"))
        .args(["generate-model", "--shape", "tiny", "--seed", "3", "--out"])
        .arg(out.join("other"))
        .args(["--tokenizer-dir", "/nonexistent/tokenizer"])
        .output()
        .expect("runs");
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("/nonexistent/tokenizer/tokenizer.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A server whose model does not load exits 1 and leaves the reason in its termination-message
/// file, where the kubelet (and so the operator's `ModelLoaded` condition) reads it.
#[test]
fn serve_writes_why_the_model_did_not_load_to_the_termination_log() {
    let dir = Scratch::new("serve-fails");
    let missing = dir.join("no-such-model");
    let config = format!("modelPath: {}\nauth: {{mode: none}}\n", missing.display());
    let termination_log = dir.join("termination-log");
    std::fs::write(&termination_log, "").expect("termination log");
    let out = common::serve_until_exit(&dir, &config, &termination_log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let message = std::fs::read_to_string(&termination_log).expect("read");
    assert!(
        message.starts_with(&format!(
            "cannot load the model: modelPath {}: no such file or directory",
            missing.display()
        )),
        "{message}"
    );
    assert!(stderr.contains(&message), "{stderr}");
    // Without the file (a process outside Kubernetes) nothing is created.
    let elsewhere = dir.join("absent");
    let out = common::serve_until_exit(&dir, &config, &elsewhere);
    assert_eq!(out.status.code(), Some(1));
    assert!(!elsewhere.exists());
}
