//! No request body makes the server fail: a thousand valid chat requests, each mutated at one
//! to three random places (a value replaced by an odd one, a field dropped, an unknown field
//! added, a type changed), are sent four at a time (so that they share the engine's batches)
//! to the real application with the real engine and a tiny random-weight model. Every answer must be a success or an Azure-shaped client error (never
//! 500), and afterwards the engine thread still runs and the server still answers.
//!
//! The mutations (the workspace's `json-mutations` crate, shared with the operator's
//! tests/spec_mutations.rs) come from a fixed seed, so a failure names a case that reproduces.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use json_mutations::{Random, mutate};
use serde_json::{Value, json};

/// Cases sent.
const CASES: usize = 1000;
/// Requests in flight together.
const WAVE: usize = 4;
/// Completion tokens a case may ask for at most: a request that would generate more (or sets
/// no limit) is given this limit after its mutations, so that the test's time goes into many
/// requests rather than long generations in an unoptimised test build. Values the server
/// must refuse (negative, zero, fractional, not a number, past the context) are left as
/// mutated.
const MAX_TOKENS: u64 = 4;

/// Valid requests that exercise the parameters the mutations then break.
fn valid_requests() -> Vec<Value> {
    let user = json!([{"role": "user", "content": "Say something."}]);
    vec![
        json!({"messages": user, "max_tokens": 4}),
        json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]}],
               "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "seed": 7,
               "stop": ["\n", "."], "presence_penalty": 0.5, "frequency_penalty": 0.5}),
        json!({"messages": user, "max_tokens": 3, "logprobs": true, "top_logprobs": 2,
               "n": 2, "stream": true}),
        json!({"messages": user, "max_tokens": 3, "stream": true,
               "stream_options": {"include_usage": true}}),
        json!({"messages": user, "max_tokens": 3,
               "tools": [{"type": "function", "function": {
                   "name": "f", "description": "d",
                   "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}],
               "tool_choice": "auto"}),
        json!({"messages": user, "max_tokens": 3, "response_format": {"type": "text"},
               "model": "any", "user": "u-1"}),
        json!({"messages": user, "max_tokens": 3, "best_of": 2, "use_beam_search": true,
               "temperature": 0, "ignore_eos": true, "skip_special_tokens": false,
               "stop_token_ids": [13]}),
        json!({"messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "f", "arguments": "{\"a\": \"x\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
               "max_tokens": 3}),
    ]
}

/// Caps a served request's generation at [`MAX_TOKENS`]: a positive `max_tokens` up to the
/// context becomes that, and a missing or null one is set to it.
fn bound_generation(body: &mut Value) {
    let Value::Object(map) = body else { return };
    match map.get("max_tokens").and_then(Value::as_u64) {
        Some(n) if n > MAX_TOKENS && n <= CONTEXT => {
            map.insert("max_tokens".into(), json!(MAX_TOKENS));
        }
        // Missing or null: the default, up to the context (tests/http_context.rs).
        None if map.get("max_tokens").is_none_or(Value::is_null) => {
            map.insert("max_tokens".into(), json!(MAX_TOKENS));
        }
        _ => {}
    }
}

/// The context window served.
const CONTEXT: u64 = 192;

/// What every answer must be: a success (JSON, or an SSE stream ending in `[DONE]`) or an
/// Azure-shaped error with a client status or 503/429.
fn check(case: usize, body: &Value, headers: &[(&str, &str)], status: StatusCode, text: &str) {
    let context = || format!("case {case} {headers:?} {body}\n→ {status} {text}");
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{}", context());
    if status.is_success() {
        if text.starts_with("data: ") {
            assert!(text.ends_with("data: [DONE]\n\n"), "{}", context());
        } else {
            let json: Value =
                serde_json::from_str(text).unwrap_or_else(|_| panic!("{}", context()));
            assert!(json["choices"].is_array(), "{}", context());
        }
        return;
    }
    assert!(
        status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        context()
    );
    let json: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("{}", context()));
    let error = &json["error"];
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{}",
        context()
    );
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_chat_requests_never_fail_the_server() {
    let state = common::tiny_server(CONTEXT).await;
    let valid = valid_requests();
    let mut random = Random(0x5eed_1234_abcd_0001);
    let (mut ok, mut refused) = (0, 0);
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let started = std::time::Instant::now();
    // Four at a time, so that mutated requests share the engine's batches.
    for wave in 0..CASES.div_ceil(WAVE) {
        let requests: Vec<(usize, Value, &str, &str)> = (wave * WAVE..CASES.min((wave + 1) * WAVE))
            .map(|case| {
                let mut body = valid[case % valid.len()].clone();
                for _ in 0..1 + random.below(3) {
                    mutate(&mut body, &mut random);
                }
                bound_generation(&mut body);
                let extra =
                    ["pass-through", "pass-through", "drop", "error", "bogus"][random.below(5)];
                let path = ["/chat/completions", "/v1/chat/completions"][random.below(2)];
                (case, body, extra, path)
            })
            .collect();
        let answers = futures::future::join_all(requests.iter().map(|(_, body, extra, path)| {
            let request = Request::post(*path)
                .header("content-type", "application/json")
                .header("extra-parameters", *extra)
                .body(Body::from(body.to_string()))
                .expect("request");
            common::send(&state, request)
        }))
        .await;
        for ((case, body, extra, _), (status, text)) in requests.iter().zip(answers) {
            check(*case, body, &[("extra-parameters", extra)], status, &text);
            if status.is_success() {
                ok += 1;
            } else {
                refused += 1;
                let code = serde_json::from_str::<Value>(&text).expect("checked")["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                *codes
                    .entry(format!("{} {code}", status.as_u16()))
                    .or_insert(0) += 1;
            }
        }
    }
    println!(
        "{CASES} mutated requests in {:.0} s: {ok} served, {refused} refused with a client error",
        started.elapsed().as_secs_f64()
    );
    println!("refusals by status and code: {codes:?}");
    // Both outcomes occur, or the mutations test nothing.
    assert!(ok > CASES / 20 && refused > CASES / 20, "{ok} / {refused}");
    let engine = state.engine().expect("engine");
    assert!(engine.handle.is_running(), "the engine thread survived");
    let live = Request::get("/health/live")
        .body(Body::empty())
        .expect("request");
    assert_eq!(common::send(&state, live).await.0, StatusCode::OK);
    // And a plain request is still answered.
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(valid[0].to_string()))
        .expect("request");
    let (status, text) = common::send(&state, request).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

/// Values at the edges of each parameter's valid range (and a few just past them).
fn edge_values(parameter: &str) -> Vec<Value> {
    match parameter {
        "temperature" => vec![json!(0), json!(1e-6), json!(1), json!(2), json!(2.5)],
        "top_p" => vec![json!(1e-6), json!(0.01), json!(1), json!(0)],
        "seed" => vec![json!(0), json!(u64::MAX), json!(i64::MAX), json!(-1)],
        "presence_penalty" | "frequency_penalty" => {
            vec![json!(-2), json!(2), json!(0), json!(2.5)]
        }
        "max_tokens" => vec![json!(1), json!(MAX_TOKENS), json!(0)],
        "n" => vec![json!(1), json!(2), json!(3), json!(0)],
        // On the Azure route `logprobs` takes the number of alternatives itself.
        "logprobs" => vec![
            json!(true),
            json!(false),
            json!(0),
            json!(5),
            json!(20),
            json!(21),
        ],
        "stop" => vec![
            json!("\n"),
            json!(["a"]),
            json!([" ", "e", "the", "\n"]),
            json!([]),
            json!([""]),
            json!(["x".repeat(200)]),
        ],
        "stop_token_ids" => vec![json!([128_009]), json!([0]), json!([]), json!([128_255])],
        "ignore_eos" | "skip_special_tokens" | "stream" | "use_beam_search" => {
            vec![json!(true), json!(false)]
        }
        "best_of" => vec![json!(1), json!(2), json!(3)],
        "response_format" => vec![json!({"type": "text"}), json!({"type": "json_object"})],
        "stream_options" => vec![json!({"include_usage": true})],
        _ => vec![Value::Null],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_but_plausible_parameters_are_served_or_refused_cleanly() {
    const PARAMETERS: [&str; 17] = [
        "temperature",
        "top_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "n",
        "logprobs",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "stream",
        "use_beam_search",
        "best_of",
        "response_format",
        "stream_options",
    ];
    const EDGE_CASES: usize = 400;
    let state = common::tiny_server(CONTEXT).await;
    let mut random = Random(0x5eed_1234_abcd_0002);
    let (mut ok, mut refused, mut streamed) = (0, 0, 0);
    for wave in 0..EDGE_CASES.div_ceil(WAVE) {
        let bodies: Vec<(usize, Value)> = (wave * WAVE..EDGE_CASES.min((wave + 1) * WAVE))
            .map(|case| {
                let mut body = json!({"messages": [{"role": "user", "content": "Go on."}],
                                      "max_tokens": MAX_TOKENS});
                for _ in 0..2 + random.below(5) {
                    let parameter = PARAMETERS[random.below(PARAMETERS.len())];
                    let values = edge_values(parameter);
                    body[parameter] = values[random.below(values.len())].clone();
                }
                (case, body)
            })
            .collect();
        let answers = futures::future::join_all(
            bodies
                .iter()
                .map(|(_, body)| common::post_chat(&state, body.clone())),
        )
        .await;
        for ((case, body), (status, text)) in bodies.iter().zip(answers) {
            check(
                *case,
                body,
                &[("extra-parameters", "pass-through")],
                status,
                &text,
            );
            if !status.is_success() {
                refused += 1;
                continue;
            }
            ok += 1;
            if text.starts_with("data: ") {
                check_stream(*case, body, &text);
                streamed += 1;
            } else {
                // A served request answers `n` choices (beam search: `n` of its `best_of`).
                let json: Value = serde_json::from_str(&text).expect("checked");
                let n = body["n"].as_u64().unwrap_or(1);
                assert_eq!(
                    json["choices"].as_array().map(Vec::len),
                    Some(n as usize),
                    "case {case} {body}: {text}"
                );
                // `logprobs: k` gives every sampled token k alternatives (`true`: none).
                let k = match &body["logprobs"] {
                    Value::Bool(true) => Some(0),
                    value => value.as_u64().map(|k| k as usize),
                };
                let beam = body["use_beam_search"] == json!(true);
                if let (Some(k), false) = (k, beam) {
                    let mut entries = 0;
                    for choice in json["choices"].as_array().expect("choices") {
                        let tokens = choice["logprobs"]["content"]
                            .as_array()
                            .unwrap_or_else(|| panic!("case {case} {body}: {text}"));
                        entries += tokens.len();
                        for token in tokens {
                            assert_eq!(
                                token["top_logprobs"].as_array().map(Vec::len),
                                Some(k),
                                "case {case} {body}: {token}"
                            );
                        }
                    }
                    // One entry per completion token, over all choices (with `best_of`
                    // above `n`, usage also counts the candidates not returned).
                    if body["best_of"].as_u64().is_none_or(|best_of| best_of <= n) {
                        assert_eq!(
                            Some(entries as u64),
                            json["usage"]["completion_tokens"].as_u64(),
                            "case {case} {body}: {text}"
                        );
                    }
                }
            }
        }
    }
    println!(
        "{EDGE_CASES} edge-valued requests: {ok} served ({streamed} streamed), {refused} refused"
    );
    assert!(ok > EDGE_CASES / 4, "{ok} served");
    assert!(streamed > EDGE_CASES / 20, "{streamed} streamed");
    assert!(state.engine().expect("engine").handle.is_running());
}

/// A served stream: every choice index below `n` appears and ends with exactly one
/// `finish_reason`, and with `include_usage` one usage chunk (no choices) comes last before
/// `[DONE]`, counting the prompt.
fn check_stream(case: usize, body: &Value, text: &str) {
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| {
            serde_json::from_str(data).unwrap_or_else(|e| panic!("case {case}: {e}: {data}"))
        })
        .collect();
    let n = body["n"].as_u64().unwrap_or(1) as usize;
    let mut finished = vec![0usize; n];
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().expect("index") as usize;
            assert!(index < n, "case {case} {body}: index {index} of {n}");
            if choice["finish_reason"].is_string() {
                finished[index] += 1;
            }
        }
    }
    assert!(
        finished.iter().all(|&f| f == 1),
        "case {case} {body}: finish reasons per choice {finished:?}"
    );
    if body["stream_options"]["include_usage"] == json!(true) {
        let last = chunks.last().expect("chunks");
        assert!(
            last["usage"]["prompt_tokens"]
                .as_u64()
                .is_some_and(|p| p > 0),
            "case {case} {body}: last chunk {last}"
        );
        assert_eq!(last["choices"], json!([]), "case {case}: {last}");
    }
}
