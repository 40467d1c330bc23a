//! The key/value cache's element type: chosen by the weights' storage (`auto`: f16 for 16-bit
//! and quantized weights, f32 for f32 ones) or by `engine.kvCacheDtype`, changeable only while
//! no cache holds rows, reported by `/metrics`, and served end to end. (That an f16 cache keeps
//! the models within the transformers goldens is checked in reference_goldens.rs; that the
//! attention kernels read it exactly, in their unit tests.)

mod common;

use axum::http::{Request, StatusCode};
use candle_core::{DType, Device};
use llama_server::engine::{LlamaConfig, LlamaModel, LogitsFor, SequenceStep};
use llama_server::generate_model::{GenerateModel, ModelShape, WeightDtype};
use serde_json::{Value, json};

use common::{tiny_model, tokenizer_dir};

/// Bytes a token of `dir`'s model takes in a cache of `element` bytes per value.
fn token_bytes(dir: &std::path::Path, element: u64) -> u64 {
    let config = LlamaConfig::from_file(&dir.join("config.json")).expect("config");
    2 * (config.num_hidden_layers * config.kv_heads() * config.head_dim()) as u64 * element
}

#[test]
fn auto_gives_f16_to_16_bit_weights_and_keeps_f32_for_f32_ones() {
    let f32_dir = tiny_model(ModelShape::Tiny, 42);
    let model = LlamaModel::load(&f32_dir, DType::F32, &Device::Cpu).expect("f32 model");
    assert_eq!(model.kv_dtype(), DType::F32);
    assert_eq!(model.kv_bytes_per_token(), token_bytes(&f32_dir, 4));

    let scratch = tempfile::tempdir().expect("scratch");
    let bf16_dir = scratch.path().join("bf16");
    GenerateModel {
        shape: ModelShape::Tiny,
        seed: 42,
        out: bf16_dir.clone(),
        tokenizer_dir: tokenizer_dir(),
        dtype: WeightDtype::Bf16,
    }
    .run()
    .expect("bf16 model");
    // Computed in f32 on the CPU, as `serve` does, with a 16-bit cache.
    let model = LlamaModel::load(&bf16_dir, DType::F32, &Device::Cpu).expect("bf16 model");
    assert_eq!(model.kv_dtype(), DType::F16);
    assert_eq!(model.kv_bytes_per_token(), token_bytes(&bf16_dir, 2));
    // Computed in bf16 (a GPU's default), the cache is the compute dtype.
    let model = LlamaModel::load(&bf16_dir, DType::BF16, &Device::Cpu).expect("bf16 compute");
    assert_eq!(model.kv_dtype(), DType::BF16);
}

#[test]
fn the_dtype_changes_only_while_no_cache_holds_rows() {
    let dir = tiny_model(ModelShape::Tiny, 42);
    let mut model = LlamaModel::load(&dir, DType::F32, &Device::Cpu).expect("model");
    let err = model
        .set_kv_dtype(DType::U8)
        .expect_err("u8 is no cache type");
    assert!(err.to_string().contains("f32, f16 or bf16"), "{err}");
    model.set_kv_dtype(DType::F16).expect("an empty pool");
    assert_eq!(model.kv_pool().dtype(), DType::F16);

    let mut cache = model.new_cache();
    let logits = model
        .forward(&mut [SequenceStep {
            tokens: &[1, 2, 3, 4],
            cache: &mut cache,
            logits: LogitsFor::Last,
        }])
        .expect("forward with an f16 cache");
    let row: Vec<f32> = logits[0]
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("row");
    assert!(row.iter().all(|x| x.is_finite()), "finite logits");
    assert_eq!(cache.len(), 4);

    let err = model.set_kv_dtype(DType::F32).expect_err("rows are in use");
    assert!(err.to_string().contains("only before"), "{err}");
    assert_eq!(model.kv_dtype(), DType::F16, "the pool in use is kept");
}

/// `/metrics`' value of `llama_server_kv_cache_token_bytes`.
async fn reported_token_bytes(state: &std::sync::Arc<llama_server::state::AppState>) -> u64 {
    let request = Request::get("/metrics")
        .body(axum::body::Body::empty())
        .expect("request");
    let (status, text) = common::send(state, request).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("llama_server_kv_cache_token_bytes "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no llama_server_kv_cache_token_bytes in:\n{text}"))
}

#[tokio::test]
async fn servers_run_on_the_configured_cache_and_report_its_token_bytes() {
    let dir = tiny_model(ModelShape::Tiny, 42);
    let request = json!({"messages": [{"role": "user", "content": "Name three rivers."}],
                         "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let mut contents = Vec::new();
    for (setting, element) in [("auto", 4), ("f32", 4), ("f16", 2)] {
        let state = common::open_server(&format!(
            "modelPath: {}\nengine: {{kvCacheDtype: {setting}}}\n",
            dir.display()
        ))
        .await;
        assert_eq!(
            reported_token_bytes(&state).await,
            token_bytes(&dir, element),
            "kvCacheDtype: {setting}"
        );
        let (status, text) = common::post_chat(&state, request.clone()).await;
        assert_eq!(status, StatusCode::OK, "kvCacheDtype: {setting}: {text}");
        let body: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(body["usage"]["completion_tokens"], 24, "{setting}: {body}");
        contents.push(body["choices"][0]["message"]["content"].clone());
    }
    // Greedy decoding on the tiny model gives the same 24 tokens from an f16 cache as from an
    // f32 one (its logits move by under 2e-4; see reference_goldens.rs).
    assert_eq!(contents[0], contents[1]);
    assert_eq!(contents[1], contents[2]);
}
