//! Renders chat prompts with the model's own Jinja `chat_template`, the way Hugging Face's
//! `apply_chat_template` does (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
//! `strftime_now`, Python-style `tojson` and string methods).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::engine::error::{EngineError, Result};
use crate::tokenizer::LlamaTokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation as the template sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja template as found in `tokenizer_config.json`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template of a tokenizer; an error naming the file and the key when it has none.
    pub fn from_tokenizer(tokenizer: &LlamaTokenizer) -> Result<Self> {
        let source = tokenizer.chat_template().ok_or_else(|| {
            EngineError::ChatTemplate(format!(
                "{}; this model cannot serve chat",
                tokenizer.missing_template()
            ))
        })?;
        Self::new(source, tokenizer.bos_token(), tokenizer.eos_token())
    }

    /// Renders `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_json(
            &serde_json::to_value(messages)
                .map_err(|err| EngineError::ChatTemplate(err.to_string()))?,
            None,
            add_generation_prompt,
        )
    }

    /// Renders arbitrary JSON messages (with tool calls, content parts, …) and optional tools.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        // `tools` is always defined (null without tools), as in `apply_chat_template`.
        let context = serde_json::json!({
            "messages": messages,
            "tools": tools,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_generation_prompt": add_generation_prompt,
        });
        template
            .render(Value::from(Serde(context)))
            .map_err(template_error)
    }
}

fn template_error(err: Error) -> EngineError {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(inner) = source {
        let _ = write!(message, ": {inner}");
        source = inner.source();
    }
    EngineError::ChatTemplate(message)
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time, formatted like Python's `strftime`.
fn strftime_now(format: String) -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(seconds, &format)
}

/// Formats Unix time `seconds` (UTC) with the common `strftime` directives.
pub fn strftime(seconds: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{:02}", secs / 3600),
            Some('M') => write!(out, "{:02}", secs % 3600 / 60),
            Some('S') => write!(out, "{:02}", secs % 60),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `tojson` as Hugging Face defines it for chat templates: Python's `json.dumps` (no HTML
/// escaping, non-ASCII kept, `", "`/`": "` separators, or `","` plus newlines with `indent`),
/// keys in insertion order.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let text = value.to_string();
            out.push_str(&text);
        }
        ValueKind::String => {
            let text = value.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(text).map_err(json_error)?);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                write_json(item, indent, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                let name = key
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| key.to_string());
                out.push_str(&serde_json::to_string(&name).map_err(json_error)?);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => {
            let text = value.to_string();
            out.push_str(&serde_json::to_string(&text).map_err(json_error)?);
        }
    }
    Ok(())
}

fn json_error(err: serde_json::Error) -> Error {
    Error::new(ErrorKind::InvalidOperation, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source, "<|begin_of_text|>", "<|eot_id|>").expect("template compiles")
    }

    #[test]
    fn renders_the_llama3_format() {
        let rendered = template(LLAMA3_TEMPLATE)
            .render(
                &[
                    ChatMessage::new("system", "Be brief. "),
                    ChatMessage::new("user", "Hi"),
                ],
                true,
            )
            .expect("renders");
        assert_eq!(
            rendered,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_the_message() {
        let err = template("{{ raise_exception('only one system message') }}")
            .render(&[], false)
            .expect_err("raises");
        assert!(err.to_string().contains("only one system message"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = template("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}");
        let tools = serde_json::json!([{"a": null, "b": [1, 2.5, "<é>"], "name": "f"}]);
        let rendered = t
            .render_json(&serde_json::json!([]), Some(&tools), false)
            .expect("renders");
        assert_eq!(
            rendered,
            "[{\"a\": null, \"b\": [1, 2.5, \"<é>\"], \"name\": \"f\"}]|\
             {\n  \"a\": null,\n  \"b\": [\n    1,\n    2.5,\n    \"<é>\"\n  ],\n  \"name\": \"f\"\n}"
        );
    }

    #[test]
    fn tool_schemas_keep_the_clients_key_order() {
        // As a request body arrives: `name` before `description`, and the function's
        // parameters in the order the developer wrote them (`query` before `limit`), as
        // transformers' `tojson` keeps them. Sorted keys would show the model `limit` first.
        let body = r#"[{"type": "function", "function": {"name": "search",
            "description": "Searches.", "parameters": {"type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"]}}}]"#;
        let tools: serde_json::Value = serde_json::from_str(body).expect("json");
        let rendered = template("{{ tools[0].function | tojson }}")
            .render_json(&serde_json::json!([]), Some(&tools), false)
            .expect("renders");
        assert_eq!(
            rendered,
            "{\"name\": \"search\", \"description\": \"Searches.\", \"parameters\": \
             {\"type\": \"object\", \"properties\": {\"query\": {\"type\": \"string\"}, \
             \"limit\": {\"type\": \"integer\"}}, \"required\": [\"query\"]}}"
        );
    }

    #[test]
    fn loop_controls_methods_and_whitespace_control() {
        let t = template(
            "{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n  {{ m.content.strip() }};\n  {% if loop.index >= 2 %}{% break %}{% endif %}\n{% endfor %}",
        );
        let messages = [
            ChatMessage::new("user", " a "),
            ChatMessage::new("skip", "x"),
            ChatMessage::new("user", "b"),
            ChatMessage::new("user", "c"),
        ];
        assert_eq!(t.render(&messages, false).expect("renders"), "  a;\n  b;\n");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 00:00:00 UTC, a Friday.
        assert_eq!(strftime(1_721_952_000, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(1_721_952_000 + 3723, "%A %B %H:%M:%S %%"),
            "Friday July 01:02:03 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        let now = template("{{ strftime_now('%Y') }}")
            .render(&[], false)
            .expect("renders");
        assert!(now.parse::<i32>().is_ok_and(|y| y >= 2024), "{now}");
    }
}
