//! `ComputeQuota`: a namespace's vCPU-core limits per instance family.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The limits of a ComputeQuota. A deployment needs ceil(surge factor × instances) × cores of its
/// instance type's family; the surge factor (1.2 by default, as on Azure) is set in the operator
/// configuration. All ComputeQuotas of a namespace add up.
#[allow(clippy::duplicated_attributes)] // printcolumn repeats `type_ = "number"` by design
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llama-operator.io",
    version = "v1alpha1",
    kind = "ComputeQuota",
    plural = "computequotas",
    singular = "computequota",
    shortname = "cq",
    category = "llama-operator",
    namespaced,
    doc = "Dedicated quota for the LlamaDeployments of one namespace, like a cloud subscription's quota: vCPU-core limits per instance family and optionally a GPU total. Status shows the cores used and available per family and which deployments hold them.",
    status = "ComputeQuotaStatus",
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpus"),
    printcolumn(name = "Core-hours", type_ = "number", json_path = ".status.coreHours"),
    printcolumn(name = "Cost", type_ = "number", json_path = ".status.estimatedCost"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeQuotaSpec {
    /// vCPU-core limits, one entry per instance family (e.g. StandardNCADSA100v4Family).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["family"]))]
    #[schemars(length(max = 64))]
    pub limits: Vec<FamilyLimit>,

    /// Optional limit on the total GPUs of all deployments in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpus: Option<i64>,
}

/// The vCPU-core limit of one instance family.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FamilyLimit {
    /// The instance family, as named in the instance-type catalog (e.g. StandardNCADSA100v4Family).
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"))]
    pub family: String,

    /// vCPU cores the namespace may use in this family.
    #[schemars(range(min = 0))]
    pub cores: i64,
}

/// Usage of a namespace's quota, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeQuotaStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Used and available cores per instance family, and which deployments hold them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<FamilyUsage>,

    /// GPUs held by deployments on dedicated quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_used: Option<i64>,

    /// vCPU core-hours of all LlamaDeployments of the namespace, deleted ones included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_hours: Option<f64>,

    /// Estimated cost of all LlamaDeployments of the namespace, deleted ones included, in
    /// `currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<f64>,

    /// Currency of `estimatedCost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,

    /// The part of `coreHours` from deployments that were deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_core_hours: Option<f64>,

    /// The part of `estimatedCost` from deployments that were deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_cost: Option<f64>,

    /// The most recently deleted deployments (up to 50, newest last) and the totals each added
    /// to `retiredCoreHours` and `retiredCost`. A deployment is counted once, by UID, however
    /// often its deletion is processed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub recently_retired: Vec<RetiredDeployment>,
}

/// The final totals of one deleted LlamaDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiredDeployment {
    /// The deployment's name.
    pub name: String,
    /// The deployment's `metadata.uid`.
    pub uid: String,
    /// vCPU core-hours it accrued over its life.
    pub core_hours: f64,
    /// Its estimated cost, in the ComputeQuota's `currency`.
    pub estimated_cost: f64,
    /// When its totals were moved into the retired sums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Time>,
}

/// Usage of one instance family.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    /// The instance family.
    pub family: String,
    /// The limit from the spec.
    pub limit: i64,
    /// Cores held by admitted deployments (surge reserve included).
    pub used: i64,
    /// limit − used, never below zero.
    pub available: i64,
    /// The deployments holding cores of this family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<QuotaHolder>,
}

/// A deployment holding quota.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaHolder {
    /// The LlamaDeployment's name.
    pub name: String,
    /// Cores it holds.
    pub cores: i64,
    /// `dedicated` or `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::api::QuotaSource>,
}
