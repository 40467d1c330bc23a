//! Shared helpers of the integration tests: the real tokenizer and the tiny random models.

#![allow(dead_code)]

pub mod gguf;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};
use llama_server::generate_model::{GenerateModel, ModelShape, WeightDtype};

/// The shapes and seeds the goldens were made with (scripts/reference/make_goldens.py).
pub const GOLDEN_MODELS: [(ModelShape, &str, u64); 2] = [
    (ModelShape::Tiny, "tiny", 42),
    (ModelShape::TinyUntied, "tiny-untied", 7),
];

/// The directory holding the Llama 3.1 tokenizer files: `$LLAMA_TOKENIZER_DIR`, or what
/// scripts/setup-tokenizer.sh prints (it installs them on first use).
pub fn tokenizer_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LLAMA_TOKENIZER_DIR") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-tokenizer.sh");
        let output = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/setup-tokenizer.sh");
        assert!(
            output.status.success(),
            "scripts/setup-tokenizer.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}

/// The source of the generator: a cached model is reused only while it is unchanged.
const GENERATOR_SOURCE: [&str; 3] = [
    include_str!("../../src/generate_model.rs"),
    include_str!("../../src/rng.rs"),
    include_str!("../../src/engine/config.rs"),
];

/// A generated tiny model, cached under the target directory and keyed by shape, seed, the
/// generator's source and the tokenizer directory, so test runs share it without going stale.
pub fn tiny_model(shape: ModelShape, seed: u64) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let tokenizer = tokenizer_dir();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (GENERATOR_SOURCE, format!("{shape:?}"), seed, &tokenizer).hash(&mut hasher);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models");
    let out = root.join(format!("{shape:?}-{seed}-{:016x}", hasher.finish()));
    if out.join("model.safetensors").is_file() {
        return out;
    }
    // Write beside, then rename: a crashed run never leaves a half model under `out`.
    let partial = root.join(format!("partial-{}-{shape:?}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    GenerateModel {
        shape,
        seed,
        out: partial.clone(),
        tokenizer_dir: tokenizer,
        dtype: WeightDtype::F32,
    }
    .run()
    .expect("generate tiny model");
    if std::fs::rename(&partial, &out).is_err() {
        // Another test process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&partial);
    }
    out
}

/// A golden file from tests/goldens/.
pub fn golden(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden is JSON")
}

/// A JSON array of integers as token ids.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_u64().expect("integer") as u32)
        .collect()
}

/// A copy of the tiny untied model whose greedy decoding follows `chain`: after `chain[i]` the
/// most likely token is `chain[i + 1]`. Attention and MLP outputs are zero, so each step's
/// logits depend only on the current token; embedding row `chain[i]` and output row
/// `chain[i + 1]` share the unit vector `i`. The tokens must be distinct (a token has one
/// successor) and fewer than the hidden size. Cached under the target directory's models, keyed
/// by `name`, the chain and the base model, so repeated runs reuse one copy.
pub fn programmed_model(name: &str, chain: &[u32]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let mut seen = std::collections::HashSet::new();
    assert!(
        chain.iter().all(|t| seen.insert(*t)),
        "chain tokens must be distinct: {chain:?}"
    );
    let base = tiny_model(ModelShape::TinyUntied, 7);
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (include_str!("mod.rs"), &base, chain).hash(&mut hasher);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models");
    let safe_name = name.replace(|c: char| !c.is_alphanumeric(), "_");
    let out = root.join(format!("programmed-{safe_name}-{:016x}", hasher.finish()));
    if out.join("model.safetensors").is_file() {
        return out;
    }
    // Write beside, then rename, as `tiny_model` does.
    let partial = root.join(format!("partial-{}-{safe_name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    write_programmed_model(&base, chain, &partial);
    if std::fs::rename(&partial, &out).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    out
}

fn write_programmed_model(base: &Path, chain: &[u32], out: &Path) {
    std::fs::create_dir_all(out).expect("dir");
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(base.join(file), out.join(file)).expect("copy");
    }
    let mut tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).expect("load");
    let (vocab, hidden) = tensors["model.embed_tokens.weight"].dims2().expect("dims");
    assert!(chain.len() < hidden, "a chain of {} tokens", chain.len());
    let mut embed = vec![0f32; vocab * hidden];
    let mut head = vec![0f32; vocab * hidden];
    for (i, pair) in chain.windows(2).enumerate() {
        embed[pair[0] as usize * hidden + i] = 1.0;
        head[pair[1] as usize * hidden + i] = 1.0;
    }
    let matrix = |data: Vec<f32>| Tensor::from_vec(data, (vocab, hidden), &Device::Cpu).expect("t");
    tensors.insert("model.embed_tokens.weight".into(), matrix(embed));
    tensors.insert("lm_head.weight".into(), matrix(head));
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            let zeros = tensors[&name].zeros_like().expect("zeros");
            tensors.insert(name, zeros);
        } else if name == "model.norm.weight" {
            let ones = tensors[&name].ones_like().expect("ones");
            tensors.insert(name, ones);
        }
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).expect("save");
}

/// Sends `request` through the server's router in-process and returns the status and the body
/// as text.
pub async fn send(
    state: &std::sync::Arc<llama_server::state::AppState>,
    request: axum::http::Request<axum::body::Body>,
) -> (axum::http::StatusCode, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = llama_server::app(std::sync::Arc::clone(state))
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8(body.to_vec()).expect("utf-8"))
}

/// Loads the engine of `state` as the server does at start (on a blocking thread); panics with
/// the loader's error, which names what failed.
pub async fn load_engine(state: &std::sync::Arc<llama_server::state::AppState>) {
    let loader = std::sync::Arc::clone(state);
    tokio::task::spawn_blocking(move || loader.load_engine())
        .await
        .expect("join")
        .unwrap_or_else(|err| panic!("the engine loads: {err}"));
}

/// An application without authentication that serves `yaml`'s configuration, its engine
/// loaded.
pub async fn open_server(yaml: &str) -> std::sync::Arc<llama_server::state::AppState> {
    let config = llama_server::server_config::ServerConfig::from_yaml(yaml).expect("config");
    let state = llama_server::state::AppState::new(config, llama_server::auth::Authenticator::Open);
    load_engine(&state).await;
    state
}

/// [`open_server`] for the tiny model (seed 42), serving a context of `context` tokens.
pub async fn tiny_server(context: u64) -> std::sync::Arc<llama_server::state::AppState> {
    let dir = tiny_model(ModelShape::Tiny, 42);
    open_server(&format!(
        "modelPath: {}\ncontextLength: {context}\n",
        dir.display()
    ))
    .await
}

/// POSTs `body` to `/chat/completions` with `extra-parameters: pass-through`.
pub async fn post_chat(
    state: &std::sync::Arc<llama_server::state::AppState>,
    body: serde_json::Value,
) -> (axum::http::StatusCode, String) {
    let request = axum::http::Request::post("/chat/completions")
        .header("content-type", "application/json")
        .header("extra-parameters", "pass-through")
        .body(axum::body::Body::from(body.to_string()))
        .expect("request");
    send(state, request).await
}

/// Runs `llama-server serve` with the configuration `config` (YAML, written to
/// `dir/server.yaml`) and `--termination-log termination_log` until it exits: for servers that
/// must stop at start.
pub fn serve_until_exit(dir: &Path, config: &str, termination_log: &Path) -> std::process::Output {
    let path = dir.join("server.yaml");
    std::fs::write(&path, config).expect("config");
    std::process::Command::new(env!("CARGO_BIN_EXE_llama-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--termination-log")
        .arg(termination_log)
        .output()
        .expect("runs")
}
