//! `LlamaDeployment` status: what the operator observed and decided.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The observed state of a LlamaDeployment, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlamaDeploymentStatus {
    /// A one-word summary: Pending, QuotaExceeded, Provisioning, Loading, Ready, Failed or
    /// Expiring. Read `conditions` for the reason and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Standard conditions: Ready, NodePoolReady, ModelLoaded, QuotaExceeded,
    /// ScaleLimitedByQuota. Each has a reason and a message that says what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The in-cluster URL of the endpoint, e.g. http://my-llama.team-a.svc:8080. Point the Azure
    /// AI Inference or OpenAI SDK at it with one of the keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Instance counts: desired, running and ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceCounts>,

    /// What each instance's engine was configured with: `spec.engine` with the operator's
    /// defaults filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineStatus>,

    /// The autoscaler's view: observed load, recommendation and last decision. Present while
    /// autoscaling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<super::AutoscalingStatus>,

    /// Label selector of the server pods, for the scale subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Which quota pays for the deployment: `dedicated` (the namespace's ComputeQuota) or
    /// `shared` (the cluster's shared pool; the deployment is deleted at `expiresAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_source: Option<QuotaSource>,

    /// When a deployment on shared quota is deleted (creation + 168 hours by default). Unset
    /// for dedicated quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// vCPU core-hours consumed so far: for each instance, the instance type's cores × the hours
    /// it ran. Only grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_hours: Option<f64>,

    /// Estimated cost so far: for each instance, the instance type's hourly price × the hours it
    /// ran, in `currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<f64>,

    /// Currency of `estimatedCost`, from the instance-type catalog (e.g. USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,

    /// The time up to which `coreHours` and `estimatedCost` are accrued (the last checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_accrued_until: Option<Time>,

    /// The instance family whose quota the deployment holds (e.g. StandardNCADSA100v4Family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_family: Option<String>,

    /// vCPU cores of `instanceFamily` the deployment holds: ceil(surge factor × instances) ×
    /// cores per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_cores: Option<i64>,

    /// GPUs the deployment holds (ceil(surge factor × instances) × GPUs per instance), counted
    /// against the namespace's optional ComputeQuota `spec.gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_gpus: Option<i64>,

    /// The last expiry warning given for a shared-quota deployment, as hours before `expiresAt`
    /// (e.g. 24, then 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_warning_hours: Option<f64>,
}

/// A one-word summary of a LlamaDeployment's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    QuotaExceeded,
    Provisioning,
    Loading,
    Ready,
    Failed,
    Expiring,
}

/// Instance counts of a deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCounts {
    /// Instances wanted (after quota caps).
    #[serde(default)]
    pub desired: i32,
    /// Instances running (server pods created and scheduled).
    #[serde(default)]
    pub current: i32,
    /// Instances ready to serve.
    #[serde(default)]
    pub ready: i32,
}

/// The engine limits each instance was configured with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// The context window served, in tokens (prompt and completion together).
    #[serde(default)]
    pub context_length: i64,
    /// The key/value cache budget, in tokens. Unset when the model's catalog entry gives no
    /// cache size per token and `spec.engine.kvCacheTokens` is unset: the server's default
    /// (four context windows) then stands, unchecked against GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_tokens: Option<i64>,
    /// The GPU memory the budget takes when full, in GiB, from the catalog's cache size per
    /// token and `spec.engine.kvCacheDtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_gib: Option<f64>,
    /// The weight type the GPU memory estimate counts, and where it was read, e.g. `Q4_K_M
    /// (the file name in spec.source.url)`; `BF16 (spec.source.format)` for safetensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// The GPU memory the weights take, estimated from the model's parameters and the weight
    /// type, in GiB. The cache budget is what fits beside it in 90 % of the GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_gib: Option<f64>,
}

/// Which quota pays for a deployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum QuotaSource {
    Dedicated,
    Shared,
}
