//! llama-server: serves a Meta Llama model over the Azure AI Model Inference API.
#![forbid(unsafe_code)]

pub mod routes;

use axum::Router;

/// Builds the HTTP application. Tests call it in-process; `main` serves it.
pub fn app() -> Router {
    routes::router()
}
