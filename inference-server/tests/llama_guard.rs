//! Llama Guard as the content-safety classifier, end to end: a guard model whose weights are
//! programmed so that greedy decoding after the guard prompt spells a chosen answer, loaded by
//! the real engine, asked through the real HTTP application.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llama_server::auth::Authenticator;
use llama_server::generate_model::ModelShape;
use llama_server::llama_guard::{Judged, LlamaGuard, Verdict, render};
use llama_server::server_config::ServerConfig;
use llama_server::state::AppState;
use llama_server::tokenizer::LlamaTokenizer;

/// A guard model whose greedy answer after the guard prompt is `answer`, then `<|eot_id|>`
/// (the chain: the prompt's last token → the answer's tokens → `<|eot_id|>`).
fn programmed_guard(answer: &str) -> PathBuf {
    let base = common::tiny_model(ModelShape::TinyUntied, 7);
    let tokenizer = LlamaTokenizer::from_dir(&base).expect("tokenizer");
    let prompt = tokenizer
        .encode(&render(&[("user", "hello")], Judged::User), false)
        .expect("encode");
    let mut chain = vec![*prompt.last().expect("prompt")];
    chain.extend(tokenizer.encode(answer, false).expect("encode"));
    chain.push(tokenizer.token_id("<|eot_id|>").expect("eot"));
    common::programmed_model(&format!("guard-{answer}"), &chain)
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
    common::load_engine(&state).await;
    state
}

async fn chat(state: &Arc<AppState>) -> (StatusCode, serde_json::Value) {
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
        ))
        .expect("request");
    let (status, body) = common::send(state, request).await;
    (status, serde_json::from_str(&body).expect("json"))
}

#[tokio::test]
async fn an_unsafe_verdict_refuses_the_prompt_naming_the_category() {
    let state = server(&programmed_guard("unsafe\nS9"), false).await;
    let guard = state.guard.get().expect("guard loaded");
    // Both engine threads run, so both probes are green.
    assert!(guard.is_running());
    assert!(state.engine().expect("engine").handle.is_running());
    for probe in ["/health/live", "/health/ready"] {
        let request = Request::get(probe).body(Body::empty()).expect("request");
        let (status, body) = common::send(&state, request).await;
        assert_eq!(status, StatusCode::OK, "{probe}: {body}");
    }
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

/// The answers the classifier was asked about, in order.
type Judgments = Arc<Mutex<Vec<String>>>;

/// A server whose classifier passes every prompt and flags the assistant's answer from its
/// `flag_from`-th judgment on (counting from 1). A programmed guard model cannot do this: its
/// output depends only on the guard prompt's last token, which is the same for both checks.
async fn completion_flagging_server(flag_from: usize) -> (Arc<AppState>, Judgments) {
    let mut config = ServerConfig::from_yaml(&format!(
        "modelPath: demo\ntokenizerDir: {}\ncontentSafety: {{enabled: true}}\n",
        common::tokenizer_dir().display(),
    ))
    .expect("config");
    config.engine.demo_seed = 42;
    let state = AppState::new(config, Authenticator::Open);
    let judgments: Judgments = Arc::default();
    let seen = Arc::clone(&judgments);
    let classifier = LlamaGuard::from_fn(move |turns, judged| {
        if judged == Judged::User {
            return Ok(Verdict::Safe);
        }
        let (role, answer) = turns.last().copied().unwrap_or_default();
        assert_eq!(role, "assistant", "the judged answer is the last turn");
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(answer.to_owned());
        Ok(if seen.len() >= flag_from {
            Verdict::Unsafe(vec!["S1".into()])
        } else {
            Verdict::Safe
        })
    });
    state.guard.set(classifier).expect("no guard configured");
    common::load_engine(&state).await;
    (state, judgments)
}

async fn post_raw(state: &Arc<AppState>, body: serde_json::Value) -> (StatusCode, String) {
    common::post_chat(state, body).await
}

fn filtered(state: &AppState, stage: &str) -> Option<u64> {
    let prefix = format!("llama_server_content_filtered_total{{stage=\"{stage}\"}} ");
    state
        .metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|n| n.trim().parse().expect("count"))
}

fn judged(judgments: &Judgments) -> Vec<String> {
    judgments.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test]
async fn a_flagged_completion_ends_with_content_filter_and_no_text() {
    let (state, judgments) = completion_flagging_server(1).await;
    let (status, body) = post_raw(
        &state,
        serde_json::json!({"messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": 8, "ignore_eos": true, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "content_filter", "{body}");
    assert_eq!(choice["message"]["content"], "");
    // Logprob entries name their tokens: none of the flagged answer's are returned.
    assert_eq!(
        choice["logprobs"]["content"],
        serde_json::json!([]),
        "{body}"
    );
    assert_eq!(body["usage"]["completion_tokens"], 8);
    let seen = judged(&judgments);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(!seen[0].is_empty(), "the whole answer is judged");
    assert_eq!(filtered(&state, "completion"), Some(1));
    assert_eq!(filtered(&state, "prompt"), None);
}

#[tokio::test]
async fn a_streamed_completion_sends_only_judged_windows() {
    // The first window of 16 tokens is judged safe and sent; the second is flagged.
    let (state, judgments) = completion_flagging_server(2).await;
    let (status, body) = post_raw(
        &state,
        serde_json::json!({"messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": 40, "ignore_eos": true, "stream": true,
                           "logprobs": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let chunks: Vec<serde_json::Value> = body
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: {"))
        .map(|json| serde_json::from_str(&format!("{{{json}")).expect("chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finishes: Vec<&serde_json::Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&serde_json::json!("content_filter")], "{body}");
    let seen = judged(&judgments);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(!seen[0].is_empty());
    assert_eq!(streamed, seen[0], "exactly the window judged safe was sent");
    // Logprob entries (which name their tokens) go out with their text: at most the first
    // window's 16, never the flagged window's.
    let entries: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert!(
        (1..=16).contains(&entries),
        "{entries} logprob entries sent"
    );
    assert!(
        seen[1].starts_with(&seen[0]) && seen[1].len() > seen[0].len(),
        "the flagged window was never sent: {seen:?}"
    );
    assert_eq!(filtered(&state, "completion"), Some(1));
}

#[tokio::test]
async fn every_beam_is_judged() {
    let (state, judgments) = completion_flagging_server(1).await;
    let (status, body) = post_raw(
        &state,
        serde_json::json!({"messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": 4, "ignore_eos": true, "temperature": 0,
                           "use_beam_search": true, "best_of": 3, "n": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{body}");
    for choice in choices {
        assert_eq!(choice["finish_reason"], "content_filter", "{body}");
        assert_eq!(choice["message"]["content"], "");
    }
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert_eq!(judged(&judgments).len(), 2);
    assert_eq!(filtered(&state, "completion"), Some(2));
}
