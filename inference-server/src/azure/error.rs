//! The error body every non-200 answer carries, shaped so that both the Azure SDK
//! (`error.code`, `error.message`) and the OpenAI SDK (`error.type`, `error.param`) parse it,
//! with a FastAPI-style `detail` list that names the field at fault.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

/// An error answer: status, stable code, a message for humans, and the parameter at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Entries of the `detail` list: where (`loc`), what (`msg`), kind (`type`), the value.
    pub detail: Vec<ErrorDetail>,
    /// Seconds for `Retry-After`; only set on 429 and 503.
    pub retry_after: Option<u64>,
}

/// One entry of the `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            detail: Vec::new(),
            retry_after: None,
        }
    }

    /// 400 for a value the API does not accept; `param` is a JSON path like `messages[0].role`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        let mut loc = vec!["body".to_owned()];
        loc.extend(path_segments(&param));
        Self {
            detail: vec![ErrorDetail {
                loc,
                msg: message.clone(),
                kind: "value_error".into(),
                input: None,
            }],
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    /// Like [`Self::invalid`], recording the offending value.
    pub fn invalid_value(
        param: impl Into<String>,
        message: impl Into<String>,
        input: &Value,
    ) -> Self {
        let mut error = Self::invalid(param, message);
        if let Some(detail) = error.detail.first_mut() {
            detail.input = Some(input.clone());
        }
        error
    }

    /// 400 for a body that is not JSON.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 400 for unknown top-level keys under `extra-parameters: error`.
    pub fn extra_parameters(keys: &[String]) -> Self {
        let message = format!(
            "Extra parameters [{}] are not allowed when extra-parameters is not set or set to \
             'error'. Set the header 'extra-parameters' to 'drop' to ignore them or to \
             'pass-through' to give them to the model.",
            keys.iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Self {
            detail: keys
                .iter()
                .map(|key| ErrorDetail {
                    loc: vec!["body".into(), key.clone()],
                    msg: "Extra inputs are not permitted".into(),
                    kind: "extra_forbidden".into(),
                    input: None,
                })
                .collect(),
            param: keys.first().cloned(),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "extra_parameters_not_allowed",
                message,
            )
        }
    }

    /// 422 for a parameter or value this model cannot handle.
    pub fn not_supported(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        let mut loc = vec!["body".to_owned()];
        loc.extend(path_segments(&param));
        Self {
            detail: vec![ErrorDetail {
                loc,
                msg: message.clone(),
                kind: "parameter_not_supported".into(),
                input: None,
            }],
            param: Some(param),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "parameter_not_supported",
                message,
            )
        }
    }

    /// 400: the prompt was flagged by content safety.
    pub fn content_filter(category: &str) -> Self {
        Self {
            param: Some("prompt".into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "content_filter",
                format!(
                    "The response was filtered due to the prompt triggering the content \
                     management policy ({category}). Please modify your prompt and retry."
                ),
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The request body is larger than this server accepts ({limit} bytes)."),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the request body as JSON with Content-Type: application/json.",
        )
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
        }
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            )
        }
    }

    /// 500: something failed inside the server; the message is safe to show.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The OpenAI-style `type`.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "type": self.kind(),
                "status": self.status.as_u16(),
            }
        });
        if !self.detail.is_empty() {
            body["detail"] = json!(self.detail);
        }
        body
    }
}

/// `messages[0].content[1]` → `["messages", "0", "content", "1"]`.
fn path_segments(param: &str) -> Vec<String> {
    param
        .split(['.', '['])
        .map(|s| s.trim_end_matches(']'))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            headers.insert("retry-after-ms", HeaderValue::from(seconds * 1000));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_the_parameter_in_param_and_detail() {
        let body = ApiError::invalid("messages[0].role", "bad role").body();
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["param"], "messages[0].role");
        assert_eq!(body["error"]["status"], 400);
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["body", "messages", "0", "role"])
        );
    }

    #[test]
    fn retry_after_only_where_set() {
        let limited = ApiError::rate_limited("slow down", 3).into_response();
        assert_eq!(limited.headers()[header::RETRY_AFTER], "3");
        let bad = ApiError::invalid("x", "y").into_response();
        assert!(bad.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn extra_parameters_lists_every_key() {
        let error = ApiError::extra_parameters(&["foo".into(), "bar".into()]);
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("'foo', 'bar'"));
        assert_eq!(error.detail.len(), 2);
    }
}
