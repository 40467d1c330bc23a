//! Tool calls end to end over HTTP: a model programmed so that greedy decoding after the chat
//! prompt writes a Llama 3.1 JSON tool call and then `<|eom_id|>`, loaded by the real engine
//! and asked through the real application, plain and streamed; `tool_choice: none` and no
//! tools leave the same text as content; `required` and a named function are refused (422).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use llama_server::chat_template::ChatTemplate;
use llama_server::generate_model::ModelShape;
use llama_server::state::AppState;
use llama_server::tokenizer::LlamaTokenizer;
use serde_json::{Value, json};

/// What the model writes. The spacing is chosen so that every token of it is distinct under
/// the Llama 3 tokenizer (the canonical `{"name": …, "parameters": {…}}` repeats `":` and
/// ` "`), which the programmed chain needs; it is still the Llama 3.1 JSON tool-call format.
const CALL: &str = r#"{"name": "get_weather","parameters":{"city":"Oslo"}}"#;

/// Llama 3.1 ends a tool call with `<|eom_id|>` (id 128008; this tokenizer file names it
/// `<|reserved_special_token_4|>`, the model's `eos_token_id` list makes it a stop token).
const EOM_ID: u32 = 128_008;

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}])
}

fn messages() -> Value {
    json!([{"role": "user", "content": "What is the weather in Oslo?"}])
}

/// The served model's chat template: Llama 3.1 with JSON tool calling, as the demo model
/// installs it (the npm tokenizer package carries the plain Llama 3 template, which renders
/// no tools).
const TOOL_TEMPLATE: &str = include_str!("../src/templates/llama-3.1-tools.jinja");

/// The programmed model: the chat prompt's last token → the call's tokens → `<|eom_id|>`,
/// with the tool-calling chat template.
fn tool_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = common::tiny_model(ModelShape::TinyUntied, 7);
        let tokenizer = LlamaTokenizer::from_dir(&base).expect("tokenizer");
        assert!(tokenizer.is_stop(EOM_ID), "<|eom_id|> ends generation");
        let template =
            ChatTemplate::new(TOOL_TEMPLATE, tokenizer.bos_token(), tokenizer.eos_token())
                .expect("template");
        let last = |tools: Option<&Value>| {
            let text = template
                .render_json(&messages(), tools, true)
                .expect("render");
            *tokenizer
                .encode(&text, false)
                .expect("encode")
                .last()
                .expect("prompt")
        };
        let start = last(Some(&tools()));
        // With and without tools the prompt ends with the assistant header, so both
        // continue into the call.
        assert_eq!(start, last(None));
        let call = tokenizer.encode(CALL, false).expect("encode");
        assert_eq!(call.len(), CALL_TOKENS);
        assert_eq!(tokenizer.decode(&call, false).expect("decode"), CALL);
        let mut chain = vec![start];
        chain.extend(&call);
        chain.push(EOM_ID);
        let dir = common::programmed_model("tool-call", &chain);
        let path = dir.join("tokenizer_config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        config["chat_template"] = Value::String(TOOL_TEMPLATE.to_owned());
        std::fs::write(&path, config.to_string()).expect("write");
        dir
    })
    .clone()
}

/// The tokens of `CALL`.
const CALL_TOKENS: usize = 14;

/// How many tokens the served model's prompt for `messages` (and `tools`) has.
fn prompt_tokens(messages: &Value, tools: Option<&Value>) -> u64 {
    let tokenizer = LlamaTokenizer::from_dir(&tool_model()).expect("tokenizer");
    let template = ChatTemplate::from_tokenizer(&tokenizer).expect("template");
    let text = template.render_json(messages, tools, true).expect("render");
    tokenizer.encode(&text, false).expect("encode").len() as u64
}

async fn server() -> Arc<AppState> {
    common::open_server(&format!("modelPath: {}\n", tool_model().display())).await
}

async fn post(state: &Arc<AppState>, path: &str, body: Value) -> (StatusCode, String) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    common::send(state, request).await
}

async fn post_json(state: &Arc<AppState>, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = post(state, path, body).await;
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, json)
}

/// The events of a stream, which must be exactly `data: …\n\n` each and end with `[DONE]`.
fn chunks(body: &str) -> Vec<Value> {
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let events: Vec<&str> = body
        .strip_suffix("\n\n")
        .expect("terminated")
        .split("\n\n")
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|event| {
            let json = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
        })
        .collect()
}

fn assert_the_call(call: &Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{call}"
    );
    assert_eq!(call["function"]["name"], "get_weather", "{call}");
    let arguments = call["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("arguments are a JSON string: {call}"));
    let arguments: Value = serde_json::from_str(arguments).expect("arguments are JSON");
    assert_eq!(arguments, json!({"city": "Oslo"}));
}

#[tokio::test]
async fn a_tool_call_is_returned_as_tool_calls() {
    let state = server().await;
    for path in ["/chat/completions", "/v1/chat/completions"] {
        let (status, body) = post_json(
            &state,
            path,
            json!({"messages": messages(), "tools": tools(), "temperature": 0}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let choices = body["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 1, "{body}");
        let choice = &choices[0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{path}: {body}");
        let message = &choice["message"];
        assert_eq!(message["role"], "assistant");
        assert!(message["content"].is_null(), "{path}: {body}");
        let calls = message["tool_calls"].as_array().expect("tool_calls");
        assert_eq!(calls.len(), 1, "{body}");
        assert_the_call(&calls[0]);
        // The tool definitions were rendered into the prompt by the tool-calling template.
        let with_tools = prompt_tokens(&messages(), Some(&tools()));
        assert!(with_tools > prompt_tokens(&messages(), None));
        assert_eq!(body["usage"]["prompt_tokens"], with_tools, "{body}");
        // The call's tokens and its `<|eom_id|>` are the completion.
        assert_eq!(
            body["usage"]["completion_tokens"],
            CALL_TOKENS + 1,
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_streamed_tool_call_is_one_tool_calls_delta_then_done() {
    let state = server().await;
    let (status, body) = post(
        &state,
        "/chat/completions",
        json!({"messages": messages(), "tools": tools(), "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chunks = chunks(&body);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
    }
    // The role first, with empty content.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    // The call's JSON is held back, never sent as text.
    let with_choices: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"].as_array().expect("choices").is_empty())
        .collect();
    let text: String = with_choices
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "", "{body}");
    let deltas: Vec<&Value> = with_choices
        .iter()
        .map(|c| &c["choices"][0]["delta"]["tool_calls"])
        .filter(|calls| !calls.is_null())
        .collect();
    assert_eq!(deltas.len(), 1, "one tool_calls delta: {body}");
    let calls = deltas[0].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{body}");
    assert_eq!(calls[0]["index"], 0);
    assert_the_call(&calls[0]);
    // The last chunk of the choice carries the delta, finish_reason and usage.
    let last = with_choices.last().expect("chunks");
    assert!(
        !last["choices"][0]["delta"]["tool_calls"].is_null(),
        "{body}"
    );
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{body}");
    assert_eq!(
        last["usage"]["completion_tokens"],
        CALL_TOKENS + 1,
        "{body}"
    );
    let finishes = with_choices
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1, "{body}");
    // include_usage: a final chunk with no choices, before [DONE].
    let tail = chunks.last().expect("chunks");
    assert_eq!(tail["choices"], json!([]), "{body}");
    assert_eq!(tail["usage"], last["usage"], "{body}");
}

#[tokio::test]
async fn tool_choice_none_and_no_tools_return_the_text_as_content() {
    let state = server().await;
    let without_tools = prompt_tokens(&messages(), None);
    for (case, body) in [
        (
            "tool_choice none",
            json!({"messages": messages(), "tools": tools(), "tool_choice": "none",
                   "temperature": 0}),
        ),
        (
            "no tools",
            json!({"messages": messages(), "temperature": 0}),
        ),
    ] {
        let (status, body) = post_json(&state, "/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{case}: {body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["message"]["content"], CALL, "{case}: {body}");
        assert!(choice["message"]["tool_calls"].is_null(), "{case}: {body}");
        assert_eq!(choice["finish_reason"], "stop", "{case}: {body}");
        // The tool definitions are not rendered into the prompt either.
        assert_eq!(
            body["usage"]["prompt_tokens"], without_tools,
            "{case}: {body}"
        );
    }
    // Streamed, the same text arrives as content deltas.
    let (status, body) = post(
        &state,
        "/chat/completions",
        json!({"messages": messages(), "tools": tools(), "tool_choice": "none",
               "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chunks = chunks(&body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, CALL, "{body}");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["delta"]["tool_calls"].is_null()),
        "{body}"
    );
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{body}");
}

#[tokio::test]
async fn a_conversation_with_an_earlier_call_and_its_result_is_rendered() {
    let state = server().await;
    let history = |arguments: Value| {
        json!([
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
             "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C, cloudy"},
        ])
    };
    let (status, body) = post_json(
        &state,
        "/chat/completions",
        json!({"messages": history(json!(r#"{"city": "Oslo"}"#)), "tools": tools(),
               "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The template sees the earlier call's arguments as an object, the result as ipython.
    let expected = prompt_tokens(&history(json!({"city": "Oslo"})), Some(&tools()));
    assert!(expected > prompt_tokens(&messages(), Some(&tools())));
    assert_eq!(body["usage"]["prompt_tokens"], expected, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    assert_the_call(&body["choices"][0]["message"]["tool_calls"][0]);
}

#[tokio::test]
async fn forced_tool_choices_are_422() {
    let state = server().await;
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let (status, body) = post_json(
            &state,
            "/chat/completions",
            json!({"messages": messages(), "tools": tools(), "tool_choice": choice}),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{choice}: {body}");
        assert_eq!(body["error"]["code"], "parameter_not_supported", "{body}");
        assert_eq!(body["error"]["param"], "tool_choice", "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("constrained decoding"), "{message}");
    }
    // An unknown string is a 400 naming the parameter.
    let (status, body) = post_json(
        &state,
        "/chat/completions",
        json!({"messages": messages(), "tools": tools(), "tool_choice": "always"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "tool_choice", "{body}");
}
