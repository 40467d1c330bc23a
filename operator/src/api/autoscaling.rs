//! Autoscaling on LLM load: the targets a deployment sets and what the autoscaler saw and did.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation that turns the operator's autoscaler off even when `minInstances` <
/// `maxInstances`, leaving `instanceCount` to an HPA, KEDA or `kubectl scale`.
pub const AUTOSCALING_ANNOTATION: &str = "llama-operator.io/autoscaling";

/// Per-instance load targets of the autoscaler and how fast it reacts. Used only while
/// autoscaling is on (`spec.compute.minInstances` < `spec.compute.maxInstances`).
///
/// For every signal the autoscaler computes ceil(total load over all instances ÷ per-instance
/// target) and wants the largest of these counts, within [minInstances, maxInstances] and the
/// quota. It scales up at once and down only after `scaleDownStabilizationSeconds` during which
/// every evaluation called for fewer instances.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Chat completion requests in flight (running or queued) per instance. Defaults to 8, half
    /// the server's default batch of 16, which leaves room for bursts before latency grows.
    #[serde(default = "default_requests_in_flight")]
    #[schemars(range(min = 0.1, max = 100000.0))]
    pub target_requests_in_flight: f64,

    /// Requests waiting for a batch slot per instance. Defaults to 2: a standing queue means the
    /// instances are saturated.
    #[serde(default = "default_queue_depth")]
    #[schemars(range(min = 0.1, max = 100000.0))]
    pub target_queue_depth: f64,

    /// Generated tokens per second per instance. Unset (the default) leaves this signal out,
    /// since what an instance sustains depends on the model and the GPU; set it from a
    /// `llama-load` run against one instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 10000000.0))]
    pub target_tokens_per_second: Option<f64>,

    /// KV-cache reservation per instance, in percent of its KV-cache budget. Defaults to 80.
    #[serde(default = "default_kv_cache_percent")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub target_kv_cache_percent: f64,

    /// How often each instance's /metrics is read, in seconds. Defaults to 15.
    #[serde(default = "default_scrape_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub scrape_interval_seconds: i64,

    /// How long load must stay below what the current instances are sized for before instances
    /// are removed, in seconds; the count then drops to the highest count called for during that
    /// time. Defaults to 300 (5 minutes).
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: i64,
}

fn default_requests_in_flight() -> f64 {
    8.0
}

fn default_queue_depth() -> f64 {
    2.0
}

fn default_kv_cache_percent() -> f64 {
    80.0
}

fn default_scrape_interval() -> i64 {
    15
}

fn default_stabilization() -> i64 {
    300
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            target_requests_in_flight: default_requests_in_flight(),
            target_queue_depth: default_queue_depth(),
            target_tokens_per_second: None,
            target_kv_cache_percent: default_kv_cache_percent(),
            scrape_interval_seconds: default_scrape_interval(),
            scale_down_stabilization_seconds: default_stabilization(),
        }
    }
}

/// What the autoscaler observed at its last evaluation and what it decided.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The instance count the autoscaler wants (before a quota cap, see `instances.desired`).
    #[serde(default)]
    pub desired_instances: i32,

    /// The count the load called for at the last evaluation, before stabilization and bounds.
    #[serde(default)]
    pub recommended_instances: i32,

    /// The last evaluation (a read of every instance's /metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluation_time: Option<Time>,

    /// The last time `desiredInstances` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,

    /// The last decision, in words, e.g. "scaled up from 1 to 3: 22 requests in flight over a
    /// target of 8 per instance".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,

    /// Since when every evaluation has called for fewer instances than `desiredInstances`; the
    /// scale-down happens once `scaleDownStabilizationSeconds` have passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_pending_since: Option<Time>,

    /// The highest count called for since `scaleDownPendingSince`: what a scale-down goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_pending_to: Option<i32>,

    /// The load summed over the instances that answered.
    #[serde(default)]
    pub load: ObservedLoad,
}

/// Load summed over the instances whose /metrics answered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedLoad {
    /// Instances whose /metrics answered.
    #[serde(default)]
    pub instances_reporting: i32,

    /// Running instances whose /metrics did not answer. While any is missing the autoscaler
    /// never scales down: silence is not idleness.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances_missing: Vec<String>,

    /// Chat completion requests in flight, queued ones included.
    #[serde(default)]
    pub requests_in_flight: f64,

    /// Requests waiting for a batch slot.
    #[serde(default)]
    pub queue_depth: f64,

    /// Generated tokens per second since the previous evaluation (absent at the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,

    /// KV-cache reservation, in percent of each instance's budget, summed over instances
    /// (150 means one and a half instances' worth).
    #[serde(default)]
    pub kv_cache_percent: f64,
}
