//! Wire types of the Azure AI Model Inference API (and its OpenAI-compatible aliases),
//! separate from the engine's types.

pub mod error;
pub mod request;
pub mod response;
pub mod tool_calls;

pub use error::ApiError;
