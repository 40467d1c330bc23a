//! Damaged Hugging Face model directories never take the process down: every number of
//! `config.json` in turn set to extremes (0, −1, 2³¹, 2³² − 1, 2⁴⁰, 2⁶³, 10³⁰, a string, null),
//! and the safetensors header overwritten byte by byte and its length field set to extremes,
//! either load or fail with an error; nothing panics or aborts.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use candle_core::{DType, Device};
use llama_server::engine::LlamaModel;
use llama_server::generate_model::ModelShape;
use serde_json::{Value, json};

use common::tiny_model;

/// Loads the model in `dir`; returns whether it loaded, or the panic's message.
fn attempt(dir: &Path) -> Result<bool, String> {
    catch_unwind(AssertUnwindSafe(|| {
        LlamaModel::load(dir, DType::F32, &Device::Cpu).is_ok()
    }))
    .map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    })
}

/// A scratch copy of a tiny model: its files linked, `config.json` and `model.safetensors`
/// copied so they can be changed.
fn scratch_copy(source: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("safetensors-mutations-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch");
    for entry in std::fs::read_dir(source).expect("model dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("a name");
        std::fs::copy(&path, dir.path().join(name)).expect("copy");
    }
    dir
}

/// Every number in `value` (nested objects too), as paths of keys.
fn numbers(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = value {
        for (key, item) in map {
            path.push(key.clone());
            match item {
                Value::Number(_) => out.push(path.clone()),
                Value::Object(_) => numbers(item, path, out),
                _ => {}
            }
            path.pop();
        }
    }
}

fn set_at(value: &mut Value, path: &[String], new: Value) {
    let mut at = value;
    for key in &path[..path.len() - 1] {
        at = &mut at[key.as_str()];
    }
    at[path[path.len() - 1].as_str()] = new;
}

#[test]
fn damaged_model_directories_are_refused_or_loaded_never_a_panic() {
    let source = tiny_model(ModelShape::TinyUntied, 7);
    let dir = scratch_copy(&source);
    assert_eq!(attempt(dir.path()), Ok(true), "the unchanged copy loads");
    let config_path = dir.path().join("config.json");
    let config_text = std::fs::read_to_string(&config_path).expect("config");
    let config: Value = serde_json::from_str(&config_text).expect("json");
    let mut paths = Vec::new();
    numbers(&config, &mut Vec::new(), &mut paths);
    assert!(paths.len() > 10, "{paths:?}");
    let extremes = [
        json!(0),
        json!(-1),
        json!(1u64 << 31),
        json!(u64::from(u32::MAX)),
        json!(1u64 << 40),
        json!(1u64 << 63),
        json!(1e30),
        json!("x"),
        Value::Null,
    ];
    let mut panics = Vec::new();
    let (mut loaded, mut refused) = (0, 0);
    for path in &paths {
        for extreme in &extremes {
            let mut changed = config.clone();
            set_at(&mut changed, path, extreme.clone());
            std::fs::write(&config_path, changed.to_string()).expect("write");
            match attempt(dir.path()) {
                Ok(true) => loaded += 1,
                Ok(false) => refused += 1,
                Err(why) => {
                    panics.push(format!("config.json {} = {extreme}: {why}", path.join(".")))
                }
            }
        }
    }
    std::fs::write(&config_path, &config_text).expect("restore");

    // The safetensors header: its length field, then its JSON, changed in place and restored.
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = &bytes[..8 + header_len];
    let write_header = |new: &[u8]| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .expect("open");
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(new).expect("write");
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..400 {
        let mut changed = header.to_vec();
        let what = if i < 8 {
            let value = [
                0u64,
                1,
                7,
                1 << 31,
                1 << 40,
                u64::MAX,
                header_len as u64 + 1,
                2,
            ][i];
            changed[..8].copy_from_slice(&value.to_le_bytes());
            format!("header length = {value}")
        } else {
            let at = 8 + (next() as usize) % header_len;
            changed[at] = next() as u8;
            format!("header byte {at} = {:#x}", changed[at])
        };
        write_header(&changed);
        match attempt(dir.path()) {
            Ok(true) => loaded += 1,
            Ok(false) => refused += 1,
            Err(why) => panics.push(format!("{what}: {why}")),
        }
    }
    write_header(header);
    assert_eq!(attempt(dir.path()), Ok(true), "the restored copy loads");
    println!("{loaded} loaded, {refused} refused");
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
}
