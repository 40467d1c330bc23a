//! Shared helpers of the integration tests: the real tokenizer and the tiny random models.

#![allow(dead_code)]

use std::collections::HashMap;
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

/// A freshly generated tiny model (once per test process and shape/seed).
pub fn tiny_model(shape: ModelShape, seed: u64) -> PathBuf {
    static MODELS: Mutex<Option<HashMap<(String, u64), PathBuf>>> = Mutex::new(None);
    let mut models = MODELS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let models = models.get_or_insert_with(HashMap::new);
    let key = (format!("{shape:?}"), seed);
    if let Some(dir) = models.get(&key) {
        return dir.clone();
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("models-{}", std::process::id()))
        .join(format!("{shape:?}-{seed}"));
    GenerateModel {
        shape,
        seed,
        out: out.clone(),
        tokenizer_dir: tokenizer_dir(),
        dtype: WeightDtype::F32,
    }
    .run()
    .expect("generate tiny model");
    models.insert(key, out.clone());
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
