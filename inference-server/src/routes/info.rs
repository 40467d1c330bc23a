//! `GET /info` and `GET /v1/models`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::azure::response::{ModelEntry, ModelInfo, ModelList};
use crate::state::AppState;

pub async fn info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.check(&headers) {
        return error.into_response();
    }
    Json(ModelInfo {
        model_name: state.config.model_name.clone(),
        model_type: "chat-completion",
        model_provider_name: "Meta",
    })
    .into_response()
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(error) = state.auth.check(&headers) {
        return error.into_response();
    }
    Json(ModelList {
        object: "list",
        data: vec![ModelEntry {
            id: state.config.model_name.clone(),
            object: "model",
            created: state.started,
            owned_by: "Meta",
        }],
    })
    .into_response()
}
