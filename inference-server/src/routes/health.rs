//! Liveness (the process serves HTTP and its engine threads run) and readiness (the model is
//! loaded and the server is not draining).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use serde_json::json;

use crate::azure::ApiError;
use crate::state::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

/// 503 once an engine thread (the model's or Llama Guard's) has stopped: no request can be
/// served again, and the kubelet restarts a container whose liveness probe fails.
async fn live(State(state): State<Arc<AppState>>) -> Response {
    if let Err(error) = engines_running(&state) {
        return error.into_response();
    }
    Json(json!({"status": "live"})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Err(error) = engines_running(&state) {
        return error.into_response();
    }
    if state.is_draining() {
        return ApiError::unavailable("The server is shutting down.", 2).into_response();
    }
    if state.engine().is_none() {
        return ApiError::unavailable("The model is loading.", 5).into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

/// Whether the engine threads that are loaded still run.
fn engines_running(state: &AppState) -> Result<(), ApiError> {
    let model = state.engine().map(|engine| engine.handle.is_running());
    let guard = state.guard.get().map(|guard| guard.is_running());
    stopped_engine(model, guard).map_or(Ok(()), |which| {
        Err(ApiError::unavailable(
            format!("The {which} engine has stopped; this server must be restarted."),
            5,
        ))
    })
}

/// Which engine has stopped, given whether each loaded one runs (`None`: not loaded).
fn stopped_engine(model: Option<bool>, guard: Option<bool>) -> Option<&'static str> {
    if model == Some(false) {
        Some("inference")
    } else if guard == Some(false) {
        Some("Llama Guard")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::stopped_engine;

    #[test]
    fn an_engine_that_stopped_fails_the_probes_and_one_not_loaded_does_not() {
        assert_eq!(stopped_engine(None, None), None, "still loading");
        assert_eq!(stopped_engine(Some(true), None), None);
        assert_eq!(stopped_engine(Some(true), Some(true)), None);
        assert_eq!(stopped_engine(Some(false), None), Some("inference"));
        assert_eq!(stopped_engine(Some(false), Some(false)), Some("inference"));
        assert_eq!(stopped_engine(Some(true), Some(false)), Some("Llama Guard"));
        assert_eq!(stopped_engine(None, Some(false)), Some("Llama Guard"));
    }
}
