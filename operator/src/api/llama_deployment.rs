//! `LlamaDeployment`: one Meta Llama model served on dedicated GPU instances.

use super::{
    AUTOSCALING_ANNOTATION, AutoscalingSpec, EndpointSpec, EngineSpec, LlamaDeploymentStatus,
    ModelName, WeightType,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The desired state of a LlamaDeployment: which model, from where, on which GPU instances, paid
/// by which quota, and how its endpoint is protected.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llama-operator.io",
    version = "v1alpha1",
    kind = "LlamaDeployment",
    plural = "llamadeployments",
    singular = "llamadeployment",
    shortname = "llama",
    shortname = "ld",
    category = "llama-operator",
    namespaced,
    doc = "A Meta Llama model served on dedicated GPU instances behind a key-protected endpoint that speaks the Azure AI Model Inference API, like an Azure AI Foundry managed-compute deployment. The operator provisions a GPU node pool of spec.compute.instanceType, runs llama-server on it, accounts its vCPU cores against the namespace's ComputeQuota (or the shared pool, see spec.quota) and reports the endpoint, core-hours and estimated cost in status.",
    status = "LlamaDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.compute.instanceCount",
        status_replicas_path = ".status.instances.current",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances.desired"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.instances.ready"),
    printcolumn(name = "Quota", type_ = "string", json_path = ".status.quotaSource"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.expiresAt"),
    printcolumn(name = "Core-hours", type_ = "number", json_path = ".status.coreHours"),
    printcolumn(name = "Cost", type_ = "number", json_path = ".status.estimatedCost"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", priority = 1),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = 1),
    validation = Rule::new("size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter) of at most 40 characters: it names the endpoint Service and the node pool")
)]
#[serde(rename_all = "camelCase")]
pub struct LlamaDeploymentSpec {
    /// The catalog model to serve, e.g. Meta-Llama-3.1-8B-Instruct.
    pub model: ModelName,

    /// Where the model weights come from.
    pub source: SourceSpec,

    /// The GPU instances the model runs on and how many of them.
    #[serde(default)]
    pub compute: ComputeSpec,

    /// Which quota pays for the instances. Read `useSharedQuota` before setting it.
    #[serde(default)]
    pub quota: QuotaSpec,

    /// How clients authenticate to the endpoint.
    #[serde(default)]
    pub auth: AuthSpec,

    /// Rate limits of each instance: every instance of the server enforces them on its own,
    /// so a deployment of N instances admits up to N times these numbers.
    #[serde(default)]
    pub rate_limits: RateLimitsSpec,

    /// Content safety applied to prompts and completions.
    #[serde(default)]
    pub content_safety: ContentSafetySpec,

    /// Which provider supplies the GPU nodes.
    #[serde(default)]
    pub node_pool: NodePoolSpec,

    /// The inference engine's limits on each instance: context window, key/value cache budget
    /// and element type, batch size, queue length and prefill chunk.
    #[serde(default)]
    pub engine: EngineSpec,

    /// The Service clients call: how it spreads requests over the instances.
    #[serde(default)]
    pub endpoint: EndpointSpec,
}

/// Where the model weights come from. `type` selects one source; exactly the matching field
/// (`pvc`, `url` or `huggingFace`) must be set, and none for `demo`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type != 'pvc' || has(self.pvc)").message("spec.source.pvc is required when spec.source.type is 'pvc'").field_path(".pvc"),
    validation = Rule::new("self.type != 'url' || has(self.url)").message("spec.source.url is required when spec.source.type is 'url'").field_path(".url"),
    validation = Rule::new("self.type != 'huggingFace' || has(self.huggingFace)").message("spec.source.huggingFace is required when spec.source.type is 'huggingFace'").field_path(".huggingFace"),
    validation = Rule::new("!has(self.pvc) || self.type == 'pvc'").message("spec.source.pvc is only allowed when spec.source.type is 'pvc'").field_path(".pvc"),
    validation = Rule::new("!has(self.url) || self.type == 'url'").message("spec.source.url is only allowed when spec.source.type is 'url'").field_path(".url"),
    validation = Rule::new("!has(self.huggingFace) || self.type == 'huggingFace'").message("spec.source.huggingFace is only allowed when spec.source.type is 'huggingFace'").field_path(".huggingFace"),
    validation = Rule::new("!has(self.quantization) || self.format == 'gguf'").message("spec.source.quantization is only allowed when spec.source.format is 'gguf' (safetensors weights are 16-bit)").field_path(".quantization")
)]
pub struct SourceSpec {
    /// The kind of source: `pvc` (weights already on a PersistentVolumeClaim), `url` (downloaded
    /// over HTTP(S) by an init step), `huggingFace` (downloaded from a Hugging Face repository) or
    /// `demo` (a small random-weight model that llama-server generates itself, for trials).
    #[serde(rename = "type")]
    pub type_: SourceType,

    /// For `type: pvc`: the claim and the directory on it that holds the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,

    /// For `type: url`: an http:// or https:// URL of a model archive (.tar, .tar.gz) or a single
    /// GGUF file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub url: Option<String>,

    /// For `type: url`: the expected SHA-256 of the downloaded file (64 hex digits). The download
    /// fails, and the deployment reports it, when the digest differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,

    /// For `type: huggingFace`: the repository, revision and access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,

    /// The weight format. `safetensors` expects the Hugging Face layout (config.json,
    /// *.safetensors, tokenizer.json, tokenizer_config.json); `gguf` a single .gguf file (a `url`
    /// or `huggingFace` download must give exactly one; with no tokenizer.json beside it the
    /// server uses the tokenizer and chat template in the file's metadata, else the Llama 3.1
    /// tokenizer its image bundles). A `url` ending in `.gguf` needs `gguf`. Defaults to
    /// `safetensors`.
    #[serde(default)]
    pub format: WeightFormat,

    /// For `format: gguf`: the file's weight type as llama.cpp names it (e.g. `Q4_K_M`,
    /// `Q8_0`, `F16`). It sizes the GPU memory the weights take, and so which instance types
    /// fit and how large a key/value cache fits beside them (the server keeps quantized
    /// weights quantized). Unset, the type is read from the file name in `url` or `pvc.path`
    /// (`…-Q4_K_M.gguf`), and a name without one is sized as 16-bit weights, on the safe side.
    /// The estimate is in `status.engine`. For `huggingFace` it also picks the repository's
    /// `.gguf` file of this type (its name has the type as a word), which a repository of
    /// several `.gguf` files needs. A named type is checked against the file's
    /// `general.file_type` when the server loads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<WeightType>,
}

/// The kind of weight source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceType {
    Pvc,
    Url,
    HuggingFace,
    Demo,
}

/// The on-disk format of the weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WeightFormat {
    #[default]
    Safetensors,
    Gguf,
}

/// Weights on a PersistentVolumeClaim in the deployment's namespace, mounted read-only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Directory (or .gguf file) on the claim, relative to its root. Defaults to the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
}

/// Weights downloaded from a Hugging Face model repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, e.g. meta-llama/Llama-3.2-1B-Instruct.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub repository: String,

    /// Branch, tag or commit. Defaults to `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,

    /// Secret holding the access token (Meta Llama repositories are gated and need one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the deployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Key in the Secret's data. Defaults to `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// A Secret in the deployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The GPU instances the model runs on.
///
/// With `minInstances` < `maxInstances` the operator's autoscaler decides the count between the
/// bounds from the instances' load (see `autoscaling`; `instanceCount` is then only the starting
/// count, and the decision is in `status.autoscaling`). Otherwise, or with the annotation
/// `llama-operator.io/autoscaling: disabled`, `instanceCount` is left to you, `kubectl scale`,
/// an HPA or KEDA (all through the scale subresource).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.minInstances) || !has(self.maxInstances) || self.minInstances <= self.maxInstances").message("spec.compute.minInstances must be less than or equal to spec.compute.maxInstances").field_path(".minInstances"),
    validation = Rule::new("!has(self.minInstances) || self.instanceCount >= self.minInstances").message("spec.compute.instanceCount must be greater than or equal to spec.compute.minInstances").field_path(".instanceCount"),
    validation = Rule::new("!has(self.maxInstances) || self.instanceCount <= self.maxInstances").message("spec.compute.instanceCount must be less than or equal to spec.compute.maxInstances").field_path(".instanceCount")
)]
pub struct ComputeSpec {
    /// The VM size of each instance, e.g. Standard_NC24ads_A100_v4 or Standard_ND96isr_H100_v5,
    /// from the operator's instance-type catalog. Defaults to the model's default instance type;
    /// for quantized GGUF weights (`spec.source.quantization`, or the type the file name
    /// names), to the cheapest instance type that holds them with a key/value cache for the
    /// whole context window (the model's, or `spec.engine.contextLength`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"))]
    pub instance_type: Option<String>,

    /// How many instances serve the model (each is one server replica on its own GPU node).
    /// Defaults to 1. Changed by `kubectl scale` and autoscalers through the scale subresource.
    #[serde(default = "default_instance_count")]
    #[schemars(range(min = 0, max = 1000))]
    pub instance_count: i32,

    /// Lower bound for autoscaling. Unset means autoscaling is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_instances: Option<i32>,

    /// Upper bound for autoscaling. Unset means autoscaling is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_instances: Option<i32>,

    /// Per-instance load targets and timing of the autoscaler (used only while it is on).
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
}

impl ComputeSpec {
    /// The autoscaling bounds, when the operator's autoscaler is on for this spec: both bounds
    /// set, `minInstances` < `maxInstances`, and not turned off by annotation.
    pub fn autoscaling_bounds(&self, annotations: &BTreeMap<String, String>) -> Option<(i32, i32)> {
        let off = annotations
            .get(AUTOSCALING_ANNOTATION)
            .is_some_and(|v| v.eq_ignore_ascii_case("disabled"));
        match (self.min_instances, self.max_instances) {
            (Some(min), Some(max)) if min < max && !off => Some((min, max)),
            _ => None,
        }
    }
}

fn default_instance_count() -> i32 {
    1
}

impl Default for ComputeSpec {
    fn default() -> Self {
        Self {
            instance_type: None,
            instance_count: default_instance_count(),
            min_instances: None,
            max_instances: None,
            autoscaling: AutoscalingSpec::default(),
        }
    }
}

/// Which quota pays for the deployment's vCPU cores.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSpec {
    /// Acknowledgement for the shared quota pool. The deployment is first admitted against the
    /// namespace's dedicated quota (its ComputeQuota, in vCPU cores per instance family). When that
    /// is short and this is true, it may run on the cluster's shared quota pool instead — and a
    /// deployment on shared quota is DELETED, with everything it owns, 168 hours (7 days) after its
    /// creation (the duration is set in the operator configuration; `status.expiresAt` shows the
    /// time, and Events warn 24 hours and 1 hour before). When false (the default) and dedicated
    /// quota is short, the deployment waits with condition QuotaExceeded and is never deleted.
    #[serde(default)]
    pub use_shared_quota: bool,
}

/// How clients authenticate to the endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'token' || has(self.token)").message("spec.auth.token (issuer and audience) is required when spec.auth.mode is 'token'").field_path(".token")
)]
pub struct AuthSpec {
    /// `key` (default): clients send one of two 32-character keys in the `api-key` header or as
    /// `Authorization: Bearer <key>`. `token`: clients send an Entra ID style JWT, validated
    /// against `token.issuer`, `token.audience` and the issuer's signing keys.
    #[serde(default)]
    pub mode: AuthMode,

    /// For `mode: key`: an existing Secret with the keys `primaryKey` and `secondaryKey` (32
    /// characters each). When unset the operator generates one named `<name>-keys`. Rotate a key by
    /// changing the Secret: servers pick the change up without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,

    /// For `mode: token`: what a valid token must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenAuthSpec>,
}

/// How clients authenticate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuthMode {
    #[default]
    Key,
    Token,
}

/// Token (JWT) validation settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenAuthSpec {
    /// The token issuer (`iss`), e.g. https://login.microsoftonline.com/<tenant>/v2.0.
    #[schemars(regex(pattern = r"^https://[^\s]+$"))]
    pub issuer: String,

    /// The audience (`aud`) a token must be issued for.
    #[schemars(length(min = 1, max = 1024))]
    pub audience: String,

    /// A ConfigMap whose key `jwks.json` holds the issuer's signing keys (JWKS). Required on
    /// clusters without egress to the issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_config_map_ref: Option<SecretRef>,
}

/// Rate limits, per instance: each instance of the server enforces them on its own, so a
/// deployment of N instances admits up to N times these numbers (they are not divided by the
/// instance count, which autoscalers change: the server configuration, and so the pods, stay
/// the same when the deployment scales). Requests over a limit get 429 with Retry-After.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// Prompt plus completion tokens per minute, per instance. Defaults to 200000.
    #[serde(default = "default_tokens_per_minute")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: i64,

    /// Requests per minute, per instance. Defaults to 1000.
    #[serde(default = "default_requests_per_minute")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: i64,
}

fn default_tokens_per_minute() -> i64 {
    200_000
}

fn default_requests_per_minute() -> i64 {
    1_000
}

impl Default for RateLimitsSpec {
    fn default() -> Self {
        Self {
            tokens_per_minute: default_tokens_per_minute(),
            requests_per_minute: default_requests_per_minute(),
        }
    }
}

/// Content safety: prompts and completions pass a classifier. A flagged prompt is answered with
/// 400 `content_filter`; a flagged completion ends with finish_reason `content_filter`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentSafetySpec {
    /// Whether content safety is applied. Defaults to false.
    #[serde(default)]
    pub enabled: bool,

    /// Extra words and phrases that flag a prompt or completion (matched case-insensitively),
    /// added to the server's built-in blocklist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub blocklist: Vec<String>,
}

/// Which provider supplies the deployment's GPU nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolSpec {
    /// `existing` (default): no nodes are provisioned; instances are scheduled onto existing
    /// nodes matching `nodeSelector` and the instance type. `karpenter`: a Karpenter NodePool
    /// restricted to the instance type. `kwok`: simulated nodes, for tests, demos and capacity
    /// rehearsals.
    #[serde(default)]
    pub provider: NodePoolProvider,

    /// Extra node labels the instances must match (for `existing`), or that provisioned nodes
    /// carry (for `kwok` and `karpenter`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// A GPU node provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NodePoolProvider {
    #[default]
    Existing,
    Karpenter,
    Kwok,
}
