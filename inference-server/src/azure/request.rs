//! `POST /chat/completions` request bodies: parsed from JSON by hand so that every rejection
//! names the exact parameter (`messages[2].content[0].type`) and the rule it broke.

use serde_json::{Map, Value, json};

use super::error::ApiError;

/// How unknown top-level keys are treated (the `extra-parameters` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraParameters {
    /// Unknown keys are a 400 (the Azure default).
    Error,
    /// Unknown keys are ignored.
    Drop,
    /// Unknown keys go to the model; a key it cannot handle is a 422.
    PassThrough,
}

impl ExtraParameters {
    /// Reads the header value; `None` means absent.
    pub fn from_header(value: Option<&str>) -> Result<Option<Self>, ApiError> {
        match value.map(str::trim) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("error") => Ok(Some(Self::Error)),
            Some(v) if v.eq_ignore_ascii_case("drop") => Ok(Some(Self::Drop)),
            Some(v) if v.eq_ignore_ascii_case("pass-through") => Ok(Some(Self::PassThrough)),
            Some(other) => Err(ApiError::invalid(
                "extra-parameters",
                format!(
                    "header extra-parameters has the value '{other}'; allowed values are \
                     'error', 'drop' and 'pass-through'"
                ),
            )),
        }
    }
}

/// Which client convention a route follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/chat/completions`, `/models/chat/completions`: the Azure rules.
    Azure,
    /// `/v1/chat/completions`: OpenAI clients' parameters are accepted without a header, and
    /// unknown keys are dropped unless `extra-parameters` says otherwise.
    OpenAi,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
}

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Messages as the chat template expects them (roles normalised, content flattened).
    pub messages: Vec<Value>,
    /// Tool definitions to render into the prompt (absent with `tool_choice: none`).
    pub tools: Option<Value>,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub n: usize,
    pub best_of: Option<usize>,
    /// Alternatives per token; `Some(0)` reports only the sampled token's logprob.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub use_beam_search: bool,
    pub stop_token_ids: Vec<u32>,
    pub skip_special_tokens: bool,
}

/// Keys of the Azure API itself.
const STANDARD: &[&str] = &[
    "messages",
    "model",
    "frequency_penalty",
    "presence_penalty",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "response_format",
];

/// Extra parameters Llama deployments accept in pass-through.
const LLAMA_EXTRAS: &[&str] = &[
    "n",
    "best_of",
    "logprobs",
    "ignore_eos",
    "use_beam_search",
    "stop_token_ids",
    "skip_special_tokens",
];

/// What OpenAI clients send without any header (accepted on `/v1/*`).
const OPENAI_EXTRAS: &[&str] = &[
    "n",
    "user",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "parallel_tool_calls",
    "store",
    "metadata",
];

/// Most alternatives per token `logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most completions one request may ask for (`n`, `best_of`).
pub const MAX_CHOICES: usize = 16;

impl ChatRequest {
    /// Validates a parsed body. `extra` is the header's mode (`None` when absent).
    pub fn parse(
        body: Value,
        extra: Option<ExtraParameters>,
        dialect: Dialect,
    ) -> Result<Self, ApiError> {
        let Value::Object(mut body) = body else {
            return Err(ApiError::invalid(
                "body",
                "the request body must be a JSON object",
            ));
        };
        let mode = extra.unwrap_or(match dialect {
            Dialect::Azure => ExtraParameters::Error,
            Dialect::OpenAi => ExtraParameters::Drop,
        });
        let accepted_without_header: &[&str] = match dialect {
            Dialect::Azure => &[],
            Dialect::OpenAi => OPENAI_EXTRAS,
        };
        let unknown: Vec<String> = body
            .keys()
            .filter(|k| !STANDARD.contains(&k.as_str()))
            .filter(|k| !accepted_without_header.contains(&k.as_str()))
            .cloned()
            .collect();
        match mode {
            ExtraParameters::Error if !unknown.is_empty() => {
                return Err(ApiError::extra_parameters(&unknown));
            }
            ExtraParameters::Error | ExtraParameters::Drop => {
                for key in &unknown {
                    body.remove(key);
                }
            }
            ExtraParameters::PassThrough => {
                if let Some(key) = unknown.iter().find(|k| !LLAMA_EXTRAS.contains(&k.as_str())) {
                    return Err(ApiError::not_supported(
                        key.clone(),
                        format!(
                            "this model cannot handle the extra parameter '{key}'; Llama \
                             deployments accept {}",
                            LLAMA_EXTRAS.join(", ")
                        ),
                    ));
                }
            }
        }
        Fields(body).into_request(dialect)
    }
}

/// The body's fields, taken one by one.
struct Fields(Map<String, Value>);

impl Fields {
    fn take(&mut self, key: &str) -> Option<Value> {
        match self.0.remove(key) {
            Some(Value::Null) | None => None,
            Some(value) => Some(value),
        }
    }

    fn number(&mut self, key: &str, min: f64, max: f64, default: f64) -> Result<f32, ApiError> {
        let Some(value) = self.take(key) else {
            return Ok(default as f32);
        };
        let Some(number) = value.as_f64() else {
            return Err(ApiError::invalid_value(
                key,
                format!("'{key}' must be a number"),
                &value,
            ));
        };
        if !(min..=max).contains(&number) {
            return Err(ApiError::invalid_value(
                key,
                format!("'{key}' must be between {min} and {max}, got {number}"),
                &value,
            ));
        }
        Ok(number as f32)
    }

    fn count(&mut self, key: &str, min: u64, max: u64) -> Result<Option<usize>, ApiError> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        match value.as_u64().or_else(|| whole_float(&value)) {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n as usize)),
            _ => Err(ApiError::invalid_value(
                key,
                format!("'{key}' must be an integer between {min} and {max}"),
                &value,
            )),
        }
    }

    fn flag(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        match &value {
            Value::Bool(b) => Ok(Some(*b)),
            // "True"/"False" strings have been seen from real clients: coerced.
            Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            _ => Err(ApiError::invalid_value(
                key,
                format!("'{key}' must be true or false"),
                &value,
            )),
        }
    }

    fn into_request(mut self, dialect: Dialect) -> Result<ChatRequest, ApiError> {
        let messages = match self.take("messages") {
            Some(Value::Array(list)) if !list.is_empty() => list,
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "'messages' must hold at least one message",
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "messages",
                    "'messages' must be an array of messages",
                    &other,
                ));
            }
            None => return Err(ApiError::invalid("messages", "'messages' is required")),
        };
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(model) = self.take("model")
            && !model.is_string()
        {
            return Err(ApiError::invalid_value(
                "model",
                "'model' must be a string",
                &model,
            ));
        }
        let frequency_penalty = self.number("frequency_penalty", -2.0, 2.0, 0.0)?;
        let presence_penalty = self.number("presence_penalty", -2.0, 2.0, 0.0)?;
        let temperature = self.number("temperature", 0.0, 2.0, 1.0)?;
        let top_p = self.number("top_p", 0.0, 1.0, 1.0)?;
        let mut max_tokens = self.count("max_tokens", 0, u32::MAX.into())?;
        if dialect == Dialect::OpenAi
            && let Some(n) = self.count("max_completion_tokens", 0, u32::MAX.into())?
        {
            max_tokens = Some(n);
        }
        let stop = match self.take("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.as_str().map(str::to_owned).ok_or_else(|| {
                        ApiError::invalid_value(
                            format!("stop[{i}]"),
                            "stop sequences must be strings",
                            s,
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "stop",
                    "'stop' must be a string or an array of strings",
                    &other,
                ));
            }
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid("stop", "at most 16 stop sequences"));
        }
        let seed = match self.take("seed") {
            None => None,
            Some(value) => Some(
                value
                    .as_i64()
                    .map(|s| s as u64)
                    .or_else(|| value.as_u64())
                    .ok_or_else(|| {
                        ApiError::invalid_value("seed", "'seed' must be an integer", &value)
                    })?,
            ),
        };
        let stream = self.flag("stream")?.unwrap_or(false);
        let include_usage = match self.take("stream_options") {
            None => false,
            Some(Value::Object(mut options)) => match options.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(other) => {
                    return Err(ApiError::invalid_value(
                        "stream_options.include_usage",
                        "'include_usage' must be true or false",
                        &other,
                    ));
                }
            },
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "stream_options",
                    "'stream_options' must be an object",
                    &other,
                ));
            }
        };
        if let Some(format) = self.take("response_format") {
            match format.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(kind @ ("json_object" | "json_schema")) => {
                    return Err(ApiError::not_supported(
                        "response_format",
                        format!(
                            "response_format type '{kind}' is not supported by Meta Llama \
                             models; use type 'text' and describe the JSON in the prompt"
                        ),
                    ));
                }
                _ => {
                    return Err(ApiError::invalid_value(
                        "response_format.type",
                        "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                        &format,
                    ));
                }
            }
        }
        let tool_choice = match self.take("tool_choice") {
            None => ToolChoice::Auto,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "required" => {
                return Err(ApiError::not_supported(
                    "tool_choice",
                    "tool_choice 'required' needs constrained decoding, which this deployment \
                     does not offer; use 'auto'",
                ));
            }
            Some(Value::Object(_)) => {
                return Err(ApiError::not_supported(
                    "tool_choice",
                    "forcing a named function needs constrained decoding, which this \
                     deployment does not offer; use 'auto'",
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "tool_choice",
                    "'tool_choice' must be 'auto', 'none', 'required' or an object",
                    &other,
                ));
            }
        };
        let tools = match self.take("tools") {
            None => None,
            Some(Value::Array(list)) => {
                for (i, tool) in list.iter().enumerate() {
                    let ok = tool.get("type").and_then(Value::as_str) == Some("function")
                        && tool
                            .get("function")
                            .and_then(|f| f.get("name"))
                            .and_then(Value::as_str)
                            .is_some_and(|n| !n.is_empty());
                    if !ok {
                        return Err(ApiError::invalid_value(
                            format!("tools[{i}]"),
                            "each tool must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                            tool,
                        ));
                    }
                }
                (!list.is_empty() && tool_choice == ToolChoice::Auto).then_some(Value::Array(list))
            }
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "tools",
                    "'tools' must be an array",
                    &other,
                ));
            }
        };

        // Extra parameters (present only when allowed through).
        let n = self.count("n", 1, MAX_CHOICES as u64)?.unwrap_or(1);
        let best_of = self.count("best_of", 1, MAX_CHOICES as u64)?;
        let logprobs = match (dialect, self.take("logprobs")) {
            (_, None) | (_, Some(Value::Bool(false))) => None,
            (Dialect::OpenAi, Some(Value::Bool(true))) => Some(
                self.count("top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?
                    .unwrap_or(0),
            ),
            (_, Some(Value::Bool(true))) => Some(0),
            (_, Some(value)) => match value.as_u64() {
                Some(k) if k as usize <= MAX_TOP_LOGPROBS => Some(k as usize),
                _ => {
                    return Err(ApiError::invalid_value(
                        "logprobs",
                        format!("'logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS}"),
                        &value,
                    ));
                }
            },
        };
        let ignore_eos = self.flag("ignore_eos")?.unwrap_or(false);
        let use_beam_search = self.flag("use_beam_search")?.unwrap_or(false);
        let skip_special_tokens = self.flag("skip_special_tokens")?.unwrap_or(true);
        let stop_token_ids = match self.take("stop_token_ids") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| {
                            ApiError::invalid_value(
                                format!("stop_token_ids[{i}]"),
                                "token ids must be non-negative integers",
                                v,
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(ApiError::invalid_value(
                    "stop_token_ids",
                    "'stop_token_ids' must be an array of integers",
                    &other,
                ));
            }
        };
        if let Some(best_of) = best_of {
            if best_of < n {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("'best_of' ({best_of}) must be at least 'n' ({n})"),
                ));
            }
            if stream && best_of > n {
                return Err(ApiError::invalid(
                    "best_of",
                    "'best_of' greater than 'n' cannot be streamed; set stream to false",
                ));
            }
        }
        if use_beam_search {
            if best_of.unwrap_or(1) < 2 {
                return Err(ApiError::invalid(
                    "use_beam_search",
                    "'use_beam_search' needs 'best_of' greater than 1 (the beam width)",
                ));
            }
            if temperature != 0.0 {
                return Err(ApiError::invalid(
                    "temperature",
                    "'use_beam_search' needs 'temperature' 0",
                ));
            }
            if stream {
                return Err(ApiError::invalid(
                    "use_beam_search",
                    "beam search cannot be streamed; set stream to false",
                ));
            }
        }
        Ok(ChatRequest {
            messages,
            tools,
            max_tokens,
            temperature,
            top_p,
            presence_penalty,
            frequency_penalty,
            stop,
            seed,
            stream,
            include_usage,
            n,
            best_of,
            logprobs,
            ignore_eos,
            use_beam_search,
            stop_token_ids,
            skip_special_tokens,
        })
    }
}

fn whole_float(value: &Value) -> Option<u64> {
    let f = value.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f < 4.0e9).then_some(f as u64)
}

/// Validates one message and reshapes it for the chat template.
fn message(index: usize, value: Value) -> Result<Value, ApiError> {
    let at = |field: &str| format!("messages[{index}].{field}");
    let Value::Object(mut m) = value else {
        return Err(ApiError::invalid_value(
            format!("messages[{index}]"),
            "each message must be an object with 'role' and 'content'",
            &value,
        ));
    };
    let role = match m.remove("role") {
        Some(Value::String(role)) => role,
        Some(other) => {
            return Err(ApiError::invalid_value(
                at("role"),
                "'role' must be a string",
                &other,
            ));
        }
        None => return Err(ApiError::invalid(at("role"), "'role' is required")),
    };
    let role = match role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
        other => {
            return Err(ApiError::invalid(
                at("role"),
                format!(
                    "role '{other}' is not one of 'system', 'developer', 'user', 'assistant', \
                     'tool'"
                ),
            ));
        }
    };
    let content = match m.remove("content") {
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                at("content"),
                format!("'content' is required for a {role} message"),
            ));
        }
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => content_parts(index, &parts)?,
        Some(other) => {
            return Err(ApiError::invalid_value(
                at("content"),
                "'content' must be a string or an array of content parts",
                &other,
            ));
        }
    };
    let mut out = json!({"role": role, "content": content});
    if role == "assistant"
        && let Some(calls) = m.remove("tool_calls")
        && !calls.is_null()
    {
        out["tool_calls"] = tool_calls(index, calls)?;
    }
    if role == "tool" {
        match m.remove("tool_call_id") {
            Some(Value::String(id)) => out["tool_call_id"] = Value::String(id),
            Some(Value::Null) | None => {}
            Some(other) => {
                return Err(ApiError::invalid_value(
                    at("tool_call_id"),
                    "'tool_call_id' must be a string",
                    &other,
                ));
            }
        }
    }
    Ok(out)
}

/// Text parts are joined; any other kind of part needs a multimodal model.
fn content_parts(index: usize, parts: &[Value]) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("messages[{index}].content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => text.push_str(t),
                None => {
                    return Err(ApiError::invalid_value(
                        format!("{at}.text"),
                        "a text part needs a string 'text'",
                        part,
                    ));
                }
            },
            Some(kind @ ("image_url" | "input_image" | "input_audio" | "audio_url" | "file")) => {
                return Err(ApiError::not_supported(
                    at,
                    format!(
                        "this model accepts text only; content parts of type '{kind}' are not \
                         supported"
                    ),
                ));
            }
            _ => {
                return Err(ApiError::invalid_value(
                    format!("{at}.type"),
                    "a content part's 'type' must be 'text' or 'image_url'",
                    part,
                ));
            }
        }
    }
    Ok(text)
}

/// Assistant tool calls, with `arguments` decoded from their JSON string for the template.
fn tool_calls(index: usize, calls: Value) -> Result<Value, ApiError> {
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid(
            format!("messages[{index}].tool_calls"),
            "'tool_calls' must be an array",
        ));
    };
    let mut out = Vec::with_capacity(calls.len());
    for (j, call) in calls.into_iter().enumerate() {
        let at = format!("messages[{index}].tool_calls[{j}]");
        let Some(function) = call.get("function") else {
            return Err(ApiError::invalid(
                format!("{at}.function"),
                "a tool call needs 'function' with 'name' and 'arguments'",
            ));
        };
        let Some(name) = function.get("name").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                format!("{at}.function.name"),
                "a tool call's function needs a 'name'",
            ));
        };
        let arguments = match function.get("arguments") {
            Some(Value::String(s)) => {
                serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.clone()))
            }
            Some(other) => other.clone(),
            None => json!({}),
        };
        out.push(json!({
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value, extra: Option<ExtraParameters>) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(body, extra, Dialect::Azure)
    }

    fn hello() -> Value {
        json!({"messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn defaults_are_the_apis() {
        let r = parse(hello(), None).expect("valid");
        assert_eq!(r.temperature, 1.0);
        assert_eq!(r.top_p, 1.0);
        assert_eq!(r.n, 1);
        assert!(!r.stream);
        assert!(r.skip_special_tokens);
        assert_eq!(r.messages[0], json!({"role": "user", "content": "hi"}));
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        for (key, value) in [
            ("temperature", json!(2.5)),
            ("top_p", json!(1.5)),
            ("frequency_penalty", json!(-3)),
            ("presence_penalty", json!("high")),
            ("max_tokens", json!(-1)),
        ] {
            let mut body = hello();
            body[key] = value;
            let err = parse(body, None).expect_err(key);
            assert_eq!(err.param.as_deref(), Some(key));
            assert_eq!(err.status.as_u16(), 400);
        }
    }

    #[test]
    fn unknown_keys_follow_the_header() {
        let mut body = hello();
        body["n"] = json!(2);
        body["foo"] = json!(1);
        let err = parse(body.clone(), None).expect_err("error mode");
        assert_eq!(err.code, "extra_parameters_not_allowed");
        assert!(err.message.contains("'n'") && err.message.contains("'foo'"));
        let dropped = parse(body.clone(), Some(ExtraParameters::Drop)).expect("drop");
        assert_eq!(dropped.n, 1);
        let err = parse(body.clone(), Some(ExtraParameters::PassThrough)).expect_err("foo");
        assert_eq!(err.status.as_u16(), 422);
        assert_eq!(err.param.as_deref(), Some("foo"));
        body.as_object_mut().expect("object").remove("foo");
        let passed = parse(body, Some(ExtraParameters::PassThrough)).expect("pass");
        assert_eq!(passed.n, 2);
        assert!(ExtraParameters::from_header(Some("sometimes")).is_err());
    }

    #[test]
    fn openai_routes_take_openai_parameters_without_a_header() {
        let mut body = hello();
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(3);
        body["max_completion_tokens"] = json!(5);
        body["user"] = json!("u1");
        body["logit_bias"] = json!({});
        let r = ChatRequest::parse(body, None, Dialect::OpenAi).expect("lenient");
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn openai_only_keys_pass_every_header_mode_on_v1_only() {
        let mut body = hello();
        body["parallel_tool_calls"] = json!(false);
        body["store"] = json!(false);
        body["metadata"] = json!({"team": "a"});
        for mode in [
            None,
            Some(ExtraParameters::Error),
            Some(ExtraParameters::PassThrough),
        ] {
            ChatRequest::parse(body.clone(), mode, Dialect::OpenAi).expect("accepted on /v1");
        }
        let err = ChatRequest::parse(body, None, Dialect::Azure).expect_err("not on Azure routes");
        assert_eq!(err.code, "extra_parameters_not_allowed");
    }

    #[test]
    fn images_json_mode_and_forced_tools_are_422() {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
        let err = parse(body, None).expect_err("image");
        assert_eq!(err.status.as_u16(), 422);
        assert_eq!(err.param.as_deref(), Some("messages[0].content[1]"));
        let mut body = hello();
        body["response_format"] = json!({"type": "json_object"});
        let err = parse(body, None).expect_err("json mode");
        assert_eq!(err.code, "parameter_not_supported");
        let mut body = hello();
        body["tool_choice"] = json!("required");
        assert_eq!(
            parse(body, None).expect_err("required").status.as_u16(),
            422
        );
    }

    #[test]
    fn roles_and_content_forms() {
        let body = json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ], "stream": "True"});
        let r = parse(body, None).expect("valid");
        assert_eq!(r.messages[0]["role"], "system");
        assert_eq!(r.messages[1]["content"], "ab");
        assert_eq!(
            r.messages[2]["tool_calls"][0]["function"]["arguments"]["x"],
            1
        );
        assert!(r.stream);
        let err = parse(
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            None,
        )
        .expect_err("role");
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = parse(json!({"messages": []}), None).expect_err("empty");
        assert_eq!(err.param.as_deref(), Some("messages"));
    }

    #[test]
    fn beam_search_and_best_of_rules() {
        let mut body = hello();
        body["use_beam_search"] = json!(true);
        body["best_of"] = json!(3);
        body["temperature"] = json!(0.7);
        let err = parse(body.clone(), Some(ExtraParameters::PassThrough)).expect_err("temp");
        assert_eq!(err.param.as_deref(), Some("temperature"));
        body["temperature"] = json!(0);
        assert!(parse(body, Some(ExtraParameters::PassThrough)).is_ok());
        let mut body = hello();
        body["best_of"] = json!(3);
        body["stream"] = json!(true);
        assert!(parse(body, Some(ExtraParameters::PassThrough)).is_err());
    }
}
