//! Validation the schema cannot do: it needs the catalogs and the objects the spec refers to.
//! Pure: the references are read beforehand (see `controller::dereference`).

use crate::api::{AuthMode, LlamaDeployment, NodePoolProvider, SourceType, WeightFormat};
use crate::catalog::{Architecture, InstanceType, ModelInfo};
use crate::config::Catalog;
use crate::serving::{ServingPlan, plan_serving};
use crate::weights::{Weights, weights_of};

/// A spec the user must fix. Reported as a condition; never retried until something changes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "spec.compute.instanceType {value:?} is not in the operator's instance-type catalog; use one of: {known}"
    )]
    UnknownInstanceType { value: String, known: String },
    #[error(
        "spec.model {model} with {weights} weights needs {needed_gib} GiB of GPU memory on {needed_gpus} GPU(s), but spec.compute.instanceType {instance} has {have_gib} GiB on {have_gpus} GPU(s); choose a larger instance type (e.g. {suggestion}){}",
        quantized_hint(*.weights)
    )]
    ModelDoesNotFit {
        model: String,
        /// The weight type and where it was read.
        weights: Weights,
        needed_gib: u32,
        needed_gpus: u32,
        instance: String,
        have_gib: u32,
        have_gpus: u32,
        suggestion: String,
    },
    #[error(
        "spec.model {model} with {weights} weights needs {needed_gpus} GPUs, more than any single instance type offers; it needs a multi-node deployment, which this version does not support{}",
        quantized_hint(*.weights)
    )]
    NeedsMultiNode {
        model: String,
        weights: Weights,
        needed_gpus: u32,
    },
    #[error("spec.model {model} is not in the operator's model catalog")]
    UnknownModel { model: String },
    #[error(
        "spec.model {model} takes images and text (Llama 3.2 Vision), and llama-server serves the text-only Llama 3.x models, so its weights cannot be loaded; choose a text model (e.g. Meta-Llama-3.2-3B-Instruct), or spec.source.type demo for a capacity rehearsal"
    )]
    VisionUnsupported { model: String },
    #[error(
        "{field}: Secret {name:?} does not exist in namespace {namespace}; create it or fix the name"
    )]
    SecretNotFound {
        field: &'static str,
        name: String,
        namespace: String,
    },
    #[error("{field}: Secret {name:?} lacks key(s) {missing}; keys must be 32 characters")]
    SecretKeysInvalid {
        field: &'static str,
        name: String,
        missing: String,
    },
    #[error(
        "{field}: Secret {name:?} has no non-empty key {key:?} (it has: {present}); add the key or set {field} to one it has"
    )]
    SecretKeyMissing {
        field: &'static str,
        name: String,
        key: String,
        present: String,
    },
    #[error(
        "spec.source.pvc.claimName: PersistentVolumeClaim {name:?} does not exist in namespace {namespace}; create it or fix the name"
    )]
    PvcNotFound { name: String, namespace: String },
    #[error("{message}")]
    ProviderUnavailable { message: String },
    #[error(
        "spec.source.format: spec.source.url {url:?} names a .gguf file but the format is safetensors; set spec.source.format: gguf"
    )]
    FormatMismatch { url: String },
    #[error(
        "spec.engine.contextLength: {value} tokens is more than {model} takes; use at most {max}, or leave it unset for the model's own"
    )]
    ContextLengthTooLong { model: String, value: u64, max: u64 },
    #[error(
        "{field}: {value} tokens of key/value cache (kvCacheDtype {dtype}) need {needed_gib} GiB, but {instance} has {free_gib} GiB of GPU memory beside the model's weights (90 % of its GPU memory, less {weights_gib} GiB of {weight_type} weights): use at most {fits} tokens, a smaller kvCacheDtype or a larger instance type"
    )]
    KvCacheDoesNotFit {
        field: &'static str,
        value: u64,
        needed_gib: f64,
        fits: u64,
        free_gib: f64,
        instance: String,
        dtype: crate::api::KvCacheDtype,
        weights_gib: f64,
        weight_type: crate::api::WeightType,
    },
}

impl SpecError {
    /// The condition reason (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::UnknownInstanceType { .. } => "InstanceTypeUnknown",
            SpecError::ModelDoesNotFit { .. } => "ModelDoesNotFit",
            SpecError::NeedsMultiNode { .. } => "MultiNodeUnsupported",
            SpecError::UnknownModel { .. } => "ModelUnknown",
            SpecError::VisionUnsupported { .. } => "VisionModelUnsupported",
            SpecError::SecretNotFound { .. } => "SecretNotFound",
            SpecError::SecretKeysInvalid { .. } | SpecError::SecretKeyMissing { .. } => {
                "SecretInvalid"
            }
            SpecError::PvcNotFound { .. } => "PersistentVolumeClaimNotFound",
            SpecError::ProviderUnavailable { .. } => "NodePoolProviderUnavailable",
            SpecError::FormatMismatch { .. } => "SourceFormatMismatch",
            SpecError::ContextLengthTooLong { .. } => "ContextLengthTooLong",
            SpecError::KvCacheDoesNotFit { .. } => "KvCacheDoesNotFit",
        }
    }
}

/// What the spec refers to, as found in the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct References {
    /// `spec.auth.secretRef`: None if not referenced; Some(None) if missing; Some(Some(keys)) the
    /// data keys present with a 32-character value.
    pub auth_secret: Option<Option<Vec<String>>>,
    /// `spec.source.huggingFace.tokenSecretRef`: None if not referenced; Some(None) if missing;
    /// Some(Some(keys)) the data keys present with a non-empty value (names only, never values).
    pub token_secret: Option<Option<Vec<String>>>,
    /// `spec.source.pvc.claimName`: None if not referenced; Some(found).
    pub pvc: Option<bool>,
}

/// Everything later steps need, decided from a valid spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub model: ModelInfo,
    pub instance: InstanceType,
    /// Server replicas = instances.
    pub instances: i32,
    pub provider: NodePoolProvider,
    /// The context window and key/value cache budget of each instance.
    pub serving: ServingPlan,
    /// The weight type `model`'s memory figures count.
    pub weights: Weights,
}

/// The hint a fit error ends with while the weights are 16-bit.
fn quantized_hint(weights: Weights) -> &'static str {
    if weights.weight_type.is_16_bit() {
        ", or quantized GGUF weights (spec.source.format: gguf with spec.source.quantization, e.g. Q4_K_M)"
    } else {
        ""
    }
}

/// Checks a spec against the catalogs and its references.
pub fn validate(
    ld: &LlamaDeployment,
    catalog: &Catalog,
    refs: &References,
) -> Result<Plan, SpecError> {
    let spec = &ld.spec;
    let namespace = ld.metadata.namespace.clone().unwrap_or_default();
    let listed = catalog
        .models
        .get(&spec.model)
        .ok_or_else(|| SpecError::UnknownModel {
            model: spec.model.to_string(),
        })?;
    if listed.architecture == Architecture::Vision && spec.source.type_ != SourceType::Demo {
        return Err(SpecError::VisionUnsupported {
            model: listed.name.to_string(),
        });
    }
    let types = || catalog.instance_types.values();
    let max_gpus = types().map(|t| t.gpu_count).max().unwrap_or(0);
    let largest_gpu_gib = types().map(|t| t.gpu_memory_gib).max().unwrap_or(0);
    let weights = weights_of(&spec.source);
    let model = listed.with_weights(weights.weight_type, largest_gpu_gib);
    if model.gpus_per_instance > max_gpus {
        return Err(SpecError::NeedsMultiNode {
            model: model.name.to_string(),
            weights,
            needed_gpus: model.gpus_per_instance,
        });
    }
    let instance_name = spec
        .compute
        .instance_type
        .clone()
        .unwrap_or_else(|| default_instance_type(&model, &spec.engine, weights, catalog));
    let instance = catalog
        .instance_types
        .get(&instance_name)
        .cloned()
        .ok_or_else(|| SpecError::UnknownInstanceType {
            value: instance_name.clone(),
            known: catalog
                .instance_types
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let fits = |t: &InstanceType| {
        model.gpu_memory_gib <= t.total_gpu_memory_gib() && model.gpus_per_instance <= t.gpu_count
    };
    if !fits(&instance) {
        let suggestion = catalog
            .instance_types
            .values()
            .filter(|t| fits(t))
            .min_by(|a, b| a.hourly_price.total_cmp(&b.hourly_price))
            .map(|t| t.name.clone())
            .unwrap_or_else(|| model.default_instance_type.clone());
        return Err(SpecError::ModelDoesNotFit {
            model: model.name.to_string(),
            weights,
            needed_gib: model.gpu_memory_gib,
            needed_gpus: model.gpus_per_instance,
            instance: instance.name.clone(),
            have_gib: instance.total_gpu_memory_gib(),
            have_gpus: instance.gpu_count,
            suggestion,
        });
    }
    if spec.auth.mode == AuthMode::Key
        && let (Some(secret_ref), Some(found)) = (&spec.auth.secret_ref, &refs.auth_secret)
    {
        match found {
            None => {
                return Err(SpecError::SecretNotFound {
                    field: "spec.auth.secretRef.name",
                    name: secret_ref.name.clone(),
                    namespace,
                });
            }
            Some(keys) => {
                let missing: Vec<&str> = ["primaryKey", "secondaryKey"]
                    .into_iter()
                    .filter(|k| !keys.iter().any(|have| have == k))
                    .collect();
                if !missing.is_empty() {
                    return Err(SpecError::SecretKeysInvalid {
                        field: "spec.auth.secretRef.name",
                        name: secret_ref.name.clone(),
                        missing: missing.join(", "),
                    });
                }
            }
        }
    }
    if spec.source.type_ == SourceType::HuggingFace
        && let Some(token_ref) = spec
            .source
            .hugging_face
            .as_ref()
            .and_then(|h| h.token_secret_ref.as_ref())
        && let Some(found) = &refs.token_secret
    {
        let Some(keys) = found else {
            return Err(SpecError::SecretNotFound {
                field: "spec.source.huggingFace.tokenSecretRef.name",
                name: token_ref.name.clone(),
                namespace,
            });
        };
        let key = token_ref
            .key
            .as_deref()
            .unwrap_or(crate::build::HF_TOKEN_DEFAULT_KEY);
        if !keys.iter().any(|k| k == key) {
            let present = if keys.is_empty() {
                "no keys".to_owned()
            } else {
                keys.join(", ")
            };
            return Err(SpecError::SecretKeyMissing {
                field: "spec.source.huggingFace.tokenSecretRef.key",
                name: token_ref.name.clone(),
                key: key.to_owned(),
                present,
            });
        }
    }
    if spec.source.type_ == SourceType::Url
        && spec.source.format == WeightFormat::Safetensors
        && let Some(url) = &spec.source.url
        && url_names_gguf(url)
    {
        return Err(SpecError::FormatMismatch { url: url.clone() });
    }
    if spec.source.type_ == SourceType::Pvc
        && let Some(pvc) = &spec.source.pvc
        && refs.pvc == Some(false)
    {
        return Err(SpecError::PvcNotFound {
            name: pvc.claim_name.clone(),
            namespace,
        });
    }
    let serving = plan_serving(&spec.engine, &model, &instance, weights.weight_type)?;
    Ok(Plan {
        model,
        instance,
        instances: spec.compute.instance_count,
        provider: spec.node_pool.provider,
        serving,
        weights,
    })
}

/// The instance type of a deployment that names none: for 16-bit weights the model's default
/// (the catalog's, Azure's choice); for quantized weights, which the catalog's defaults
/// oversize, the cheapest instance type that holds them with a key/value cache for the whole
/// context window (the model's, or `spec.engine.contextLength`), else the model's default.
pub fn default_instance_type(
    model: &ModelInfo,
    engine: &crate::api::EngineSpec,
    weights: Weights,
    catalog: &Catalog,
) -> String {
    if weights.weight_type.is_16_bit() {
        return model.default_instance_type.clone();
    }
    let window = engine
        .context_length
        .and_then(|c| u64::try_from(c).ok())
        .unwrap_or(u64::from(model.context_length));
    catalog
        .instance_types
        .values()
        .filter(|t| {
            model.gpu_memory_gib <= t.total_gpu_memory_gib()
                && model.gpus_per_instance <= t.gpu_count
                && plan_serving(engine, model, t, weights.weight_type)
                    .is_ok_and(|plan| plan.context_length >= window)
        })
        .min_by(|a, b| {
            a.hourly_price
                .total_cmp(&b.hourly_price)
                .then_with(|| a.name.cmp(&b.name))
        })
        .map_or_else(|| model.default_instance_type.clone(), |t| t.name.clone())
}

/// The instance type `ld` runs on, as [`validate`] decides it; `None` for a model the catalog
/// lacks.
pub fn instance_type_of(ld: &LlamaDeployment, catalog: &Catalog) -> Option<String> {
    if let Some(named) = &ld.spec.compute.instance_type {
        return Some(named.clone());
    }
    let listed = catalog.models.get(&ld.spec.model)?;
    let largest_gpu_gib = catalog
        .instance_types
        .values()
        .map(|t| t.gpu_memory_gib)
        .max()
        .unwrap_or(0);
    let weights = weights_of(&ld.spec.source);
    let model = listed.with_weights(weights.weight_type, largest_gpu_gib);
    Some(default_instance_type(
        &model,
        &ld.spec.engine,
        weights,
        catalog,
    ))
}

/// Whether a URL's path (its query and fragment aside) ends in `.gguf`: `llama-server fetch`
/// then saves a single GGUF file, which only `format: gguf` can load.
fn url_names_gguf(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.to_ascii_lowercase().ends_with(".gguf")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorConfig;

    fn ld(yaml: &str) -> LlamaDeployment {
        serde_yaml::from_str(yaml).expect("valid test YAML")
    }

    fn catalog() -> Catalog {
        OperatorConfig::default().catalog()
    }

    const BASE: &str = "
apiVersion: llama-operator.io/v1alpha1
kind: LlamaDeployment
metadata: {name: chat, namespace: team-a}
spec:
  model: Meta-Llama-3.1-8B-Instruct
  source: {type: demo}
";

    #[test]
    fn default_instance_type_comes_from_the_model() {
        let plan = validate(&ld(BASE), &catalog(), &References::default()).expect("valid");
        assert_eq!(plan.instance.name, "Standard_NC24ads_A100_v4");
        assert_eq!(plan.instances, 1);
    }

    #[test]
    fn seventy_b_does_not_fit_one_a100_and_the_message_says_what_to_do() {
        let spec = ld(&format!(
            "{}  compute: {{instanceType: Standard_NC24ads_A100_v4}}\n",
            BASE.replace("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-70B-Instruct")
        ));
        let err = validate(&spec, &catalog(), &References::default()).expect_err("does not fit");
        assert_eq!(err.reason(), "ModelDoesNotFit");
        let msg = err.to_string();
        assert!(
            msg.contains("spec.compute.instanceType Standard_NC24ads_A100_v4"),
            "{msg}"
        );
        assert!(msg.contains("158 GiB"), "{msg}");
        assert!(msg.contains("Standard_NC96ads_A100_v4"), "{msg}");
        assert!(
            msg.contains("with BF16 (spec.source.format) weights"),
            "{msg}"
        );
        assert!(msg.contains("or quantized GGUF weights"), "{msg}");
    }

    /// A 70B deployment on one A100 80 GB from `source`.
    fn seventy_b_on_one_a100(source: &str) -> LlamaDeployment {
        ld(&format!(
            "{}  compute: {{instanceType: Standard_NC24ads_A100_v4}}\n",
            BASE.replace("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-70B-Instruct")
                .replace("{type: demo}", source)
        ))
    }

    #[test]
    fn quantized_weights_default_to_the_cheapest_instance_that_holds_a_full_window() {
        let base = |model: &str, extra: &str| {
            ld(&format!(
                "{}{extra}",
                BASE.replace("Meta-Llama-3.1-8B-Instruct", model).replace(
                    "{type: demo}",
                    "{type: url, format: gguf, url: 'https://m.example/Llama-Q4_K_M.gguf'}",
                )
            ))
        };
        let chosen = |spec: &LlamaDeployment| {
            let plan = validate(spec, &catalog(), &References::default()).expect("valid");
            assert_eq!(
                instance_type_of(spec, &catalog()).as_deref(),
                Some(plan.instance.name.as_str()),
                "the cleanup's answer is validate's"
            );
            (plan.instance.name, plan.serving.context_length)
        };
        // 70B at Q4_K_M: one A100 80 GB holds the weights but only 93k tokens of cache; one
        // H100 NVL (94 GB, $6.98 an hour) holds the whole 131,072-token window. The catalog's
        // default for 16-bit weights is four A100s ($14.69).
        let seventy = "Meta-Llama-3.1-70B-Instruct";
        assert_eq!(
            chosen(&base(seventy, "")),
            ("Standard_NC40ads_H100_v5".to_owned(), 131_072)
        );
        // A 32k window fits beside the weights on one A100.
        assert_eq!(
            chosen(&base(seventy, "  engine: {contextLength: 32768}\n")),
            ("Standard_NC24ads_A100_v4".to_owned(), 32_768)
        );
        // A named instance type stands.
        assert_eq!(
            chosen(&base(
                seventy,
                "  compute: {instanceType: Standard_NC96ads_A100_v4}\n"
            ))
            .0,
            "Standard_NC96ads_A100_v4"
        );
        // 16-bit weights keep the catalog's default.
        let bf16 = ld(&BASE.replace("Meta-Llama-3.1-8B-Instruct", seventy));
        assert_eq!(chosen(&bf16).0, "Standard_NC96ads_A100_v4");
    }

    #[test]
    fn seventy_b_at_four_bits_fits_one_a100() {
        let spec = seventy_b_on_one_a100(
            "{type: url, format: gguf, url: 'https://m.example/Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf'}",
        );
        let plan = validate(&spec, &catalog(), &References::default()).expect("fits");
        assert_eq!(plan.weights.weight_type, crate::api::WeightType::Q4KM);
        assert_eq!(plan.model.gpu_memory_gib, 53);
        assert_eq!(plan.instance.name, "Standard_NC24ads_A100_v4");
        // The cache budget is what fits beside 43.56 GiB of weights (see serving's tests).
        assert!(
            plan.serving.kv_cache_tokens.is_some_and(|t| t > 90_000),
            "{:?}",
            plan.serving
        );
        // The same file at eight bits does not, and the message says what was counted.
        let spec = seventy_b_on_one_a100(
            "{type: url, format: gguf, quantization: Q8_0, url: 'https://m.example/llama-70b.gguf'}",
        );
        let err = validate(&spec, &catalog(), &References::default()).expect_err("too big");
        let msg = err.to_string();
        assert!(
            msg.contains("with Q8_0 (spec.source.quantization) weights needs 85 GiB of GPU memory on 1 GPU(s)"),
            "{msg}"
        );
        // The cheapest that holds it: one H100 NVL (94 GiB).
        assert!(msg.contains("e.g. Standard_NC40ads_H100_v5"), "{msg}");
        assert!(!msg.contains("or quantized GGUF weights"), "{msg}");
        // A GGUF file whose type nothing names is sized as 16-bit, and the message says so.
        let spec = seventy_b_on_one_a100(
            "{type: url, format: gguf, url: 'https://m.example/llama-70b.gguf'}",
        );
        let err = validate(&spec, &catalog(), &References::default()).expect_err("too big");
        assert!(
            err.to_string()
                .contains("with F16 (assumed: set spec.source.quantization) weights"),
            "{err}"
        );
    }

    #[test]
    fn unknown_instance_type_lists_the_known_ones() {
        let spec = ld(&format!("{BASE}  compute: {{instanceType: Standard_X1}}\n"));
        let err = validate(&spec, &catalog(), &References::default()).expect_err("unknown");
        assert_eq!(err.reason(), "InstanceTypeUnknown");
        assert!(
            err.to_string().contains("Standard_ND96isr_H100_v5"),
            "{err}"
        );
    }

    #[test]
    fn missing_references_name_field_and_object() {
        let spec = ld(&format!("{BASE}  auth: {{secretRef: {{name: my-keys}}}}\n"));
        let refs = References {
            auth_secret: Some(None),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("missing secret");
        assert_eq!(err.reason(), "SecretNotFound");
        assert!(
            err.to_string()
                .starts_with("spec.auth.secretRef.name: Secret \"my-keys\""),
            "{err}"
        );

        let refs = References {
            auth_secret: Some(Some(vec!["primaryKey".into()])),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("missing key");
        assert!(err.to_string().contains("secondaryKey"), "{err}");

        let spec = ld(&BASE.replace("{type: demo}", "{type: pvc, pvc: {claimName: weights}}"));
        let refs = References {
            pvc: Some(false),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("missing pvc");
        assert_eq!(err.reason(), "PersistentVolumeClaimNotFound");
    }

    #[test]
    fn a_missing_hugging_face_token_secret_names_its_field() {
        let spec = ld(&BASE.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.1-8B-Instruct, \
             tokenSecretRef: {name: hf-token}}}",
        ));
        let refs = References {
            token_secret: Some(None),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("missing token secret");
        assert_eq!(err.reason(), "SecretNotFound");
        assert_eq!(
            err.to_string(),
            "spec.source.huggingFace.tokenSecretRef.name: Secret \"hf-token\" does not exist \
             in namespace team-a; create it or fix the name"
        );
        let refs = References {
            token_secret: Some(Some(vec!["token".into()])),
            ..Default::default()
        };
        validate(&spec, &catalog(), &refs).expect("the token Secret exists");
    }

    #[test]
    fn a_token_secret_without_its_key_names_the_key_field_and_the_keys_it_has() {
        let spec = ld(&BASE.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.1-8B-Instruct, \
             tokenSecretRef: {name: hf-token, key: hf}}}",
        ));
        let refs = References {
            token_secret: Some(Some(vec!["token".into(), "user".into()])),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("missing key");
        assert_eq!(err.reason(), "SecretInvalid");
        assert_eq!(
            err.to_string(),
            "spec.source.huggingFace.tokenSecretRef.key: Secret \"hf-token\" has no non-empty \
             key \"hf\" (it has: token, user); add the key or set \
             spec.source.huggingFace.tokenSecretRef.key to one it has"
        );
        // Without `key`, the default `token` is looked for.
        let spec = ld(&BASE.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.1-8B-Instruct, \
             tokenSecretRef: {name: hf-token}}}",
        ));
        let refs = References {
            token_secret: Some(Some(vec![])),
            ..Default::default()
        };
        let err = validate(&spec, &catalog(), &refs).expect_err("empty secret");
        assert!(
            err.to_string()
                .contains("no non-empty key \"token\" (it has: no keys)")
        );
    }

    #[test]
    fn a_gguf_url_needs_the_gguf_format() {
        let url = "{type: url, url: 'https://models.example/llama-8b-Q4_K_M.GGUF?sig=x'}";
        let spec = ld(&BASE.replace("{type: demo}", url));
        let err = validate(&spec, &catalog(), &References::default()).expect_err("safetensors");
        assert_eq!(err.reason(), "SourceFormatMismatch");
        assert!(err.to_string().starts_with("spec.source.format: "), "{err}");
        assert!(
            err.to_string().contains("set spec.source.format: gguf"),
            "{err}"
        );

        let gguf = url.replace("}", ", format: gguf}");
        validate(
            &ld(&BASE.replace("{type: demo}", &gguf)),
            &catalog(),
            &References::default(),
        )
        .expect("gguf format");
        let archive = "{type: url, url: 'https://models.example/llama-8b.tar.gz'}";
        validate(
            &ld(&BASE.replace("{type: demo}", archive)),
            &catalog(),
            &References::default(),
        )
        .expect("an archive in the Hugging Face layout");
    }

    #[test]
    fn vision_weights_are_refused_but_a_vision_rehearsal_is_planned() {
        let spec = |source: &str| {
            ld(&format!(
                "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: v, namespace: a}}\nspec:\n  model: Llama-3.2-11B-Vision-Instruct\n  source: {source}\n"
            ))
        };
        let err = validate(
            &spec("{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.2-11B-Vision-Instruct}}"),
            &catalog(),
            &References::default(),
        )
        .expect_err("vision weights");
        assert_eq!(err.reason(), "VisionModelUnsupported");
        assert!(
            err.to_string()
                .starts_with("spec.model Llama-3.2-11B-Vision-Instruct takes images"),
            "{err}"
        );
        let plan = validate(&spec("{type: demo}"), &catalog(), &References::default())
            .expect("a demo rehearsal of a vision deployment");
        assert_eq!(plan.model.name.to_string(), "Llama-3.2-11B-Vision-Instruct");
    }

    #[test]
    fn four_o_five_b_needs_multi_node() {
        let spec = ld(&BASE.replace("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-405B-Instruct"));
        let err = validate(&spec, &catalog(), &References::default()).expect_err("multi-node");
        assert_eq!(err.reason(), "MultiNodeUnsupported");
        assert!(
            err.to_string().contains("or quantized GGUF weights"),
            "{err}"
        );
        // At four bits its 301 GiB fit one node of eight GPUs: the cheapest, eight A100s, with
        // room for 677k tokens of cache.
        let spec = ld(&BASE
            .replace("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-405B-Instruct")
            .replace(
                "{type: demo}",
                "{type: pvc, format: gguf, pvc: {claimName: w, path: 405b/Llama-3.1-405B-Instruct-Q4_K_M.gguf}}",
            ));
        let plan = validate(&spec, &catalog(), &References::default()).expect("fits one node");
        assert_eq!(plan.instance.name, "Standard_ND96amsr_A100_v4");
        assert_eq!(plan.model.gpus_per_instance, 4);
    }
}
