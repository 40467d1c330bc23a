//! Llama 3.1 JSON tool calls: when tools were offered, a completion that is one JSON object
//! `{"name": …, "parameters": {…}}` (optionally after `<|python_tag|>`) is a tool call.

use serde_json::Value;

use super::response::{FunctionCall, ToolCall};

/// The tool calls in `text`, or `None` when it is an ordinary answer. Several calls may be
/// separated by `;` (as Llama 3.1 does for parallel calls).
pub fn parse(text: &str, id_seed: &str) -> Option<Vec<ToolCall>> {
    let body = text.trim();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
    if !body.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    for (i, part) in split_calls(body).into_iter().enumerate() {
        let value: Value = serde_json::from_str(part).ok()?;
        let name = value.get("name")?.as_str()?.to_owned();
        let arguments = value
            .get("parameters")
            .or_else(|| value.get("arguments"))
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let arguments = match arguments {
            Value::String(s) => s,
            other => other.to_string(),
        };
        calls.push(ToolCall {
            id: format!("call_{id_seed}_{i}"),
            kind: "function",
            function: FunctionCall { name, arguments },
        });
    }
    (!calls.is_empty()).then_some(calls)
}

/// Whether `text` may still turn into a tool call as more tokens arrive (streaming holds
/// such text back).
pub fn may_become_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty()
        || t.starts_with('{')
        || "<|python_tag|>".starts_with(t)
        || t.starts_with("<|python_tag|>")
}

/// Splits `{…}; {…}` at top-level semicolons.
fn split_calls(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in body.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ';' if depth == 0 => {
                parts.push(body[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(body[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_llama_json_call_becomes_a_tool_call() {
        let calls = parse(
            r#"{"name": "get_weather", "parameters": {"city": "Oslo; Norway"}}"#,
            "x",
        )
        .expect("call");
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).expect("json");
        assert_eq!(args["city"], "Oslo; Norway");
    }

    #[test]
    fn parallel_calls_and_python_tag() {
        let calls = parse(
            r#"<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": 1}}"#,
            "y",
        )
        .expect("calls");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "b");
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn prose_is_not_a_call() {
        assert!(parse("The weather is fine.", "z").is_none());
        assert!(parse("{not json", "z").is_none());
        assert!(parse(r#"{"no_name": 1}"#, "z").is_none());
        assert!(may_become_call("  {\"na"));
        assert!(may_become_call("<|pyt"));
        assert!(!may_become_call("Hello"));
    }
}
