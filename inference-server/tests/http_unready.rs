//! The HTTP application before its model is loaded and while it drains: 503 with
//! `Retry-After`, the Azure error body, and liveness still green. In-process (no model needed).

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use llama_server::auth::{Authenticator, KeyStore};
use llama_server::server_config::ServerConfig;
use llama_server::state::AppState;
use tower::ServiceExt;

const KEY: &str = "0123456789abcdef0123456789abcdef";

async fn call(
    state: &std::sync::Arc<AppState>,
    request: Request<Body>,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let response = llama_server::app(std::sync::Arc::clone(state))
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status();
    let retry = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, retry, serde_json::from_slice(&body).expect("json"))
}

fn chat() -> Request<Body> {
    Request::post("/chat/completions")
        .header("api-key", KEY)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .expect("request")
}

#[tokio::test]
async fn not_loaded_is_503_with_retry_after() {
    let state = AppState::new(
        ServerConfig::default(),
        Authenticator::Keys(KeyStore::fixed(&[KEY])),
    );
    let (status, retry, body) = call(&state, chat()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "service_unavailable");
    assert!(retry.is_some_and(|r| r.parse::<u64>().expect("seconds") >= 1));
    let ready = Request::get("/health/ready")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&state, ready).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let live = Request::get("/health/live")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&state, live).await.0, StatusCode::OK);
}

#[tokio::test]
async fn draining_is_503_and_auth_still_comes_first() {
    let state = AppState::new(
        ServerConfig::default(),
        Authenticator::Keys(KeyStore::fixed(&[KEY])),
    );
    state.start_draining();
    let (status, retry, _) = call(&state, chat()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry.is_some());
    let anonymous = Request::post("/chat/completions")
        .body(Body::from("{}"))
        .expect("request");
    let (status, retry, body) = call(&state, anonymous).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(retry.is_none(), "Retry-After only on 429 and 503");
}

#[tokio::test]
async fn wrong_method_is_405_with_an_azure_body() {
    let state = AppState::new(ServerConfig::default(), Authenticator::Open);
    let get = Request::get("/chat/completions")
        .body(Body::empty())
        .expect("request");
    let (status, retry, body) = call(&state, get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert!(retry.is_none());
}
