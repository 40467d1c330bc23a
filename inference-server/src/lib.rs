//! llama-server: serves a Meta Llama model over the Azure AI Model Inference API.
//!
//! Unsafe code is denied everywhere; the single exception is memory-mapping weight files in
//! `engine::weights`, with its safety argument written next to it.
#![deny(unsafe_code)]

pub mod args;
pub mod auth;
pub mod azure;
pub mod beam;
pub mod bench;
pub mod chat_template;
pub mod check_goldens;
pub mod content_safety;
pub mod device;
pub mod engine;
pub mod fetch;
pub mod generate_model;
pub mod generation;
pub mod gguf_export;
pub mod llama_guard;
pub mod malloc_tuning;
pub mod metrics;
pub mod rate_limit;
pub mod rng;
pub mod routes;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod server_config;
pub mod state;
pub mod stop_strings;
pub mod tokenizer;

use std::sync::Arc;

use axum::Router;

/// Builds the HTTP application around shared state. Tests call it in-process; `main` serves it.
pub fn app(state: Arc<state::AppState>) -> Router {
    routes::router(state)
}
