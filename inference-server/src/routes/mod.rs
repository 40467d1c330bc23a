//! HTTP routes, one module per route group. Every route is served at `/`, `/models/` and
//! `/v1/` (the Azure SDK appends routes to whatever endpoint the user configured).

mod chat;
mod health;
mod info;
mod metrics;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::azure::ApiError;
use crate::state::AppState;

/// All routes of the server.
pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .merge(health::router())
        .route("/metrics", get(metrics::metrics))
        .route("/v1/models", get(info::models))
        .route("/v1/chat/completions", post(chat::openai));
    for prefix in ["", "/models", "/v1"] {
        app = app
            .route(&format!("{prefix}/info"), get(info::info))
            .route(&format!("{prefix}/embeddings"), any(no_embeddings))
            .route(&format!("{prefix}/images/embeddings"), any(no_embeddings));
        if prefix != "/v1" {
            app = app.route(&format!("{prefix}/chat/completions"), post(chat::azure));
        }
    }
    app.fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        .with_state(state)
}

async fn no_embeddings() -> Response {
    ApiError::not_found(
        "This deployment serves a chat-completion model; embeddings are not available here.",
    )
    .into_response()
}

async fn unknown_route(request: Request) -> Response {
    ApiError::not_found(format!(
        "No route {} {}. This server answers /info and /chat/completions (also under /models/ \
         and /v1/), /v1/models, /health/live, /health/ready and /metrics.",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::method_not_allowed(format!(
        "{} is not allowed on {}.",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

/// Counts every answered request by route template and status.
async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    state
        .metrics
        .count_request(&route, response.status().as_u16());
    response
}

/// The metric label of a path: the path itself for served routes (a fixed set), `other` for
/// anything else, so arbitrary paths cannot grow the metric's label set.
fn route_label(path: &str) -> String {
    const SERVED: &[&str] = &[
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v1/models",
        "/info",
        "/models/info",
        "/v1/info",
        "/chat/completions",
        "/models/chat/completions",
        "/v1/chat/completions",
        "/embeddings",
        "/models/embeddings",
        "/v1/embeddings",
        "/images/embeddings",
        "/models/images/embeddings",
        "/v1/images/embeddings",
    ];
    let path = path.trim_end_matches('/');
    SERVED
        .iter()
        .find(|s| **s == path)
        .map_or_else(|| "other".to_owned(), |s| (*s).to_owned())
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn every_served_route_has_its_own_label_and_anything_else_is_other() {
        for prefix in ["", "/models", "/v1"] {
            for route in ["/info", "/embeddings", "/images/embeddings"] {
                let path = format!("{prefix}{route}");
                assert_eq!(route_label(&path), path);
                assert_eq!(route_label(&format!("{path}/")), path);
            }
        }
        assert_eq!(route_label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_label("/images/embeddings/x"), "other");
        assert_eq!(route_label("/nope"), "other");
    }
}
