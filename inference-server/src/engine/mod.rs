//! The inference engine: model configuration, weights, the Llama forward pass and its caches.

pub mod config;
mod cpu_argmax;
mod cpu_attention;
mod cpu_decode_kernel;
mod cpu_exp;
mod cpu_features;
#[cfg(target_arch = "x86_64")]
mod cpu_lanes;
mod cpu_pool;
#[cfg(target_arch = "x86_64")]
mod cpu_prefetch;
mod cpu_prefill_attention;
#[cfg(target_arch = "x86_64")]
mod cpu_prefill_tiles;
mod cpu_slice;
mod cpu_swiglu;
pub mod error;
pub mod gguf;
mod grouped_matmul;
pub mod kquants;
pub mod kquants_x8;
pub mod kv_cache;
pub mod kv_pool;
pub mod linear;
mod matrix_shape;
pub mod model;
mod out_columns;
pub mod placement;
pub mod q8_0;
pub mod rope;
mod weight_buffer;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{EngineError, Result};
pub use kv_cache::KvCache;
pub use kv_pool::KvPool;
pub use model::{LlamaModel, LogitsFor, SequenceStep};
pub use placement::Placement;
