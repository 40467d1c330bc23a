//! llama-server: serves a Meta Llama model over the Azure AI Model Inference API.
//!
//! Unsafe code is denied everywhere; the single exception is memory-mapping weight files in
//! `engine::weights`, with its safety argument written next to it.
#![deny(unsafe_code)]

pub mod args;
pub mod chat_template;
pub mod engine;
pub mod generate_model;
pub mod generation;
pub mod rng;
pub mod routes;
pub mod sampling;
pub mod stop_strings;
pub mod tokenizer;

use axum::Router;

/// Builds the HTTP application. Tests call it in-process; `main` serves it.
pub fn app() -> Router {
    routes::router()
}
