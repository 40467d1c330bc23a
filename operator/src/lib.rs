//! llama-operator: runs Meta Llama models on Kubernetes GPU clusters the way Azure AI Foundry
//! runs them on "managed compute".
#![forbid(unsafe_code)]

pub mod api;
pub mod autoscale;
pub mod build;
pub mod catalog;
pub mod config;
pub mod controller;
pub mod crdgen;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod quota;
pub mod serving;
pub mod validate;
pub mod weights;

pub use error::Error;
