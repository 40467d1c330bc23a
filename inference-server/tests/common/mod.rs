//! Shared helpers of the integration tests: the real tokenizer and the tiny random models.

#![allow(dead_code)]

pub mod gguf;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

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
