//! The public API of llama-operator: group `llama-operator.io`, version `v1alpha1`.
//!
//! These Rust types are the source of truth; `crds/` holds the CustomResourceDefinitions generated
//! from them by the `crdgen` binary, and a test fails when the two drift apart.

mod autoscaling;
mod compute_quota;
mod endpoint;
mod engine;
mod llama_deployment;
mod model;
mod status;
mod weight_type;

pub use autoscaling::{AUTOSCALING_ANNOTATION, AutoscalingSpec, AutoscalingStatus, ObservedLoad};
pub use compute_quota::{
    ComputeQuota, ComputeQuotaSpec, ComputeQuotaStatus, FamilyLimit, FamilyUsage, QuotaHolder,
    RetiredDeployment,
};
pub use endpoint::{EndpointSpec, SessionAffinity};
pub use engine::{EngineSpec, KvCacheDtype};
pub use llama_deployment::{
    AuthMode, AuthSpec, ComputeSpec, ContentSafetySpec, HuggingFaceSource, LlamaDeployment,
    LlamaDeploymentSpec, NodePoolProvider, NodePoolSpec, PvcSource, QuotaSpec, RateLimitsSpec,
    SecretKeyRef, SecretRef, SourceSpec, SourceType, TokenAuthSpec, WeightFormat,
};
pub use model::ModelName;
pub use status::{EngineStatus, InstanceCounts, LlamaDeploymentStatus, Phase, QuotaSource};
pub use weight_type::WeightType;

/// The API group of every resource this operator serves.
pub const GROUP: &str = "llama-operator.io";
/// The served and stored API version.
pub const VERSION: &str = "v1alpha1";
