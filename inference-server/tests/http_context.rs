//! A configured `contextLength` bounds prompt and completion together, below the model's own
//! window: a request without `max_tokens`, or with more than fits, stops at the configured
//! context with `finish_reason: length`, plain and streamed, and a prompt that leaves no room
//! is refused. The tiny model's own window is 8192 tokens; the server serves 48.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use llama_server::state::AppState;
use serde_json::{Value, json};

const CONTEXT: u64 = 48;

async fn chat(state: &Arc<AppState>, body: Value) -> (StatusCode, String) {
    common::post_chat(state, body).await
}

#[tokio::test]
async fn the_configured_context_bounds_every_completion() {
    let state = common::tiny_server(CONTEXT).await;
    let messages = json!([{"role": "user", "content": "Count."}]);
    // `ignore_eos`: the random model must not stop early, so the context is what stops it.
    for max_tokens in [Value::Null, json!(1000), json!(CONTEXT)] {
        let (status, text) = chat(
            &state,
            json!({"messages": messages, "max_tokens": max_tokens, "ignore_eos": true,
                   "temperature": 0}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let body: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            body["usage"]["total_tokens"], CONTEXT,
            "max_tokens {max_tokens}: {}",
            body["usage"]
        );
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }

    // Streamed: the usage chunk reports the same bound.
    let (status, text) = chat(
        &state,
        json!({"messages": messages, "ignore_eos": true, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let usage = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|chunk| chunk["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["total_tokens"], CONTEXT, "{usage}");

    // A prompt that leaves no room for one token is refused, naming the limit.
    let long = "word ".repeat(2 * CONTEXT as usize);
    let (status, text) = chat(
        &state,
        json!({"messages": [{"role": "user", "content": long}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains(&format!("{}", CONTEXT - 1)), "{text}");
}
