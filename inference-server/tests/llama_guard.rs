//! Llama Guard as the content-safety classifier, end to end: a guard model whose weights are
//! programmed so that greedy decoding after the guard prompt spells a chosen answer, loaded by
//! the real engine, asked through the real HTTP application.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{Device, Tensor};
use http_body_util::BodyExt;
use llama_server::auth::Authenticator;
use llama_server::generate_model::ModelShape;
use llama_server::llama_guard::{Judged, render};
use llama_server::server_config::ServerConfig;
use llama_server::state::AppState;
use llama_server::tokenizer::LlamaTokenizer;
use tower::ServiceExt;

/// A copy of the tiny untied model whose attention and MLP outputs are zero, so each step's
/// logits depend only on the current token; embeddings and output rows then form a chain:
/// the prompt's last token → the answer's tokens → `<|eot_id|>`.
fn programmed_guard(answer: &str) -> PathBuf {
    let base = common::tiny_model(ModelShape::TinyUntied, 7);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "guard-{}-{}",
        answer.replace(|c: char| !c.is_alphanumeric(), "_"),
        std::process::id()
    ));
    std::fs::create_dir_all(&out).expect("dir");
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(base.join(file), out.join(file)).expect("copy");
    }
    let tokenizer = LlamaTokenizer::from_dir(&base).expect("tokenizer");
    let prompt = tokenizer
        .encode(&render(&[("user", "hello")], Judged::User), false)
        .expect("encode");
    let mut chain = vec![*prompt.last().expect("prompt")];
    chain.extend(tokenizer.encode(answer, false).expect("encode"));
    chain.push(tokenizer.token_id("<|eot_id|>").expect("eot"));
    let mut seen = std::collections::HashSet::new();
    assert!(
        chain.iter().all(|t| seen.insert(*t)),
        "chain tokens must be distinct: {chain:?}"
    );

    let mut tensors =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).expect("load");
    let (vocab, hidden) = tensors["model.embed_tokens.weight"].dims2().expect("dims");
    assert!(chain.len() < hidden);
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
    out
}

async fn server(guard: &Path, fail_closed: bool) -> Arc<AppState> {
    let mut config = ServerConfig::from_yaml(&format!(
        "modelPath: demo\ntokenizerDir: {}\ncontentSafety: {{enabled: true, llamaGuard: \
         {{modelPath: {}, failClosed: {fail_closed}}}}}\n",
        common::tokenizer_dir().display(),
        guard.display()
    ))
    .expect("config");
    config.engine.demo_seed = 42;
    let state = AppState::new(config, Authenticator::Open);
    let loader = Arc::clone(&state);
    tokio::task::spawn_blocking(move || loader.load_engine())
        .await
        .expect("join")
        .expect("load");
    state
}

async fn chat(state: &Arc<AppState>) -> (StatusCode, serde_json::Value) {
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
        ))
        .expect("request");
    let response = llama_server::app(Arc::clone(state))
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
    (status, serde_json::from_slice(&body).expect("json"))
}

#[tokio::test]
async fn an_unsafe_verdict_refuses_the_prompt_naming_the_category() {
    let state = server(&programmed_guard("unsafe\nS9"), false).await;
    let guard = state.guard.get().expect("guard loaded");
    let verdict = guard
        .classify(&[("user", "hello")], Judged::User)
        .await
        .expect("verdict");
    assert_eq!(
        verdict,
        llama_server::llama_guard::Verdict::Unsafe(vec!["S9".into()])
    );
    let (status, body) = chat(&state).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "content_filter");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("S9: Indiscriminate Weapons"), "{message}");
}

#[tokio::test]
async fn a_safe_verdict_lets_prompt_and_completion_through() {
    let state = server(&programmed_guard("safe"), false).await;
    let (status, body) = chat(&state).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["choices"][0]["finish_reason"], "content_filter");
}

#[tokio::test]
async fn no_verdict_passes_or_refuses_as_configured() {
    let open = server(&programmed_guard("maybe"), false).await;
    assert_eq!(chat(&open).await.0, StatusCode::OK);
    assert!(
        open.metrics
            .encode()
            .contains("llama_server_content_safety_errors_total 2")
    );
    let closed = server(&programmed_guard("perhaps"), true).await;
    let (status, body) = chat(&closed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "content_filter");
}
