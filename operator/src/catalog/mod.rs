//! What the operator knows about models and instance types. Defaults are compiled in; the
//! operator configuration can override or extend both without a rebuild.

mod instance_types;
mod models;

pub use instance_types::{InstanceType, default_instance_types};
pub use models::{Architecture, ModelInfo, default_models};
