//! Liveness (the process serves HTTP) and readiness (the model is loaded and the server is not
//! draining).

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

async fn live() -> Response {
    Json(json!({"status": "live"})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        return ApiError::unavailable("The server is shutting down.", 2).into_response();
    }
    if state.engine().is_none() {
        return ApiError::unavailable("The model is loading.", 5).into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}
