//! The operator configuration: a YAML file (mounted from a ConfigMap) that overrides the
//! built-in catalogs and sets cluster-wide policy. Every field has a default.

use crate::api::ModelName;
use crate::catalog::{InstanceType, ModelInfo, default_instance_types, default_models};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Cluster-wide settings of the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// The llama-server image the workloads run (default: the CUDA build).
    pub server_image: String,
    /// The llama-server image of the init container that downloads `url` and `huggingFace`
    /// sources (`llama-server fetch`). It needs no GPU, and the CUDA build cannot start where
    /// the NVIDIA driver library is not mounted (a container without a GPU request), so the
    /// default is the CPU build.
    pub fetch_image: String,
    /// Instance types added to, or replacing by name, the built-in catalog.
    pub instance_types: Vec<InstanceType>,
    /// Model entries replacing the built-in ones by name.
    pub models: Vec<ModelInfo>,
    /// Quota reserve for rolling updates: a deployment holds ceil(factor × instances) × cores.
    pub surge_factor: f64,
    /// The cluster's shared quota pool: vCPU cores per instance family.
    pub shared_quota: BTreeMap<String, i64>,
    /// How long a deployment on shared quota lives, in hours.
    pub shared_quota_hours: f64,
    /// Seconds a server gets to finish in-flight requests and streams when stopped.
    pub drain_seconds: i64,
    /// For the Karpenter provider: the node class every NodePool references.
    pub karpenter: KarpenterConfig,
    /// Hours before `expiresAt` at which a shared-quota deployment gets a warning Event.
    pub expiry_warning_hours: Vec<f64>,
    /// How often core-hours and cost are checkpointed into status, in seconds.
    pub accrual_seconds: u64,
    /// Shifts the operator's clock forward by this many seconds: for rehearsals and tests of
    /// expiry and accrual. Keep 0 in production.
    pub clock_offset_seconds: i64,
}

/// Karpenter settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KarpenterConfig {
    /// API group of the node class, e.g. karpenter.azure.com or karpenter.kwok.sh.
    pub node_class_group: String,
    /// Kind of the node class, e.g. AKSNodeClass or KWOKNodeClass.
    pub node_class_kind: String,
    /// Name of the node class.
    pub node_class_name: String,
}

impl Default for KarpenterConfig {
    fn default() -> Self {
        Self {
            node_class_group: "karpenter.azure.com".into(),
            node_class_kind: "AKSNodeClass".into(),
            node_class_name: "default".into(),
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            // Every catalog instance type is a GPU VM: the CUDA build is what they should run.
            server_image: format!(
                "ghcr.io/llama-operator/llama-server-cuda:{}",
                env!("CARGO_PKG_VERSION")
            ),
            fetch_image: format!(
                "ghcr.io/llama-operator/llama-server:{}",
                env!("CARGO_PKG_VERSION")
            ),
            instance_types: Vec::new(),
            models: Vec::new(),
            surge_factor: 1.2,
            shared_quota: BTreeMap::new(),
            shared_quota_hours: 168.0,
            drain_seconds: 300,
            karpenter: KarpenterConfig::default(),
            expiry_warning_hours: vec![24.0, 1.0],
            accrual_seconds: 60,
            clock_offset_seconds: 0,
        }
    }
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read operator configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("operator configuration {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("operator configuration {path}: {message}")]
    Invalid { path: String, message: String },
}

impl OperatorConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|err| match err {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: shown.clone(),
                source,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: shown.clone(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: String::new(),
                source,
            })?
        };
        let invalid = |message: String| ConfigError::Invalid {
            path: String::new(),
            message,
        };
        if !(1.0..=3.0).contains(&config.surge_factor) {
            return Err(invalid(format!(
                "surgeFactor {} must be between 1.0 and 3.0",
                config.surge_factor
            )));
        }
        if config.shared_quota_hours <= 0.0 {
            return Err(invalid("sharedQuotaHours must be positive".into()));
        }
        let catalog = config.catalog();
        for model in catalog.models.values() {
            if !catalog
                .instance_types
                .contains_key(&model.default_instance_type)
            {
                return Err(invalid(format!(
                    "models: {} names defaultInstanceType {} which is not in the instance-type catalog",
                    model.name, model.default_instance_type
                )));
            }
        }
        Ok(config)
    }

    /// The operator's notion of now (the wall clock plus `clockOffsetSeconds`).
    pub fn now(&self) -> k8s_openapi::jiff::Timestamp {
        let now = k8s_openapi::jiff::Timestamp::now();
        now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
            self.clock_offset_seconds,
        ))
        .unwrap_or(now)
    }

    /// The effective catalogs: built-in entries, replaced or extended by the configuration's.
    pub fn catalog(&self) -> Catalog {
        let mut instance_types: BTreeMap<String, InstanceType> = default_instance_types()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        for t in &self.instance_types {
            instance_types.insert(t.name.clone(), t.clone());
        }
        let mut models: BTreeMap<ModelName, ModelInfo> =
            default_models().into_iter().map(|m| (m.name, m)).collect();
        for m in &self.models {
            models.insert(m.name, m.clone());
        }
        Catalog {
            instance_types,
            models,
        }
    }
}

/// The effective model and instance-type catalogs.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalog {
    pub instance_types: BTreeMap<String, InstanceType>,
    pub models: BTreeMap<ModelName, ModelInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(
            OperatorConfig::parse("").expect("parse"),
            OperatorConfig::default()
        );
    }

    #[test]
    fn instance_types_override_and_extend() {
        let config = OperatorConfig::parse(
            r#"
instanceTypes:
- {name: Standard_NC24ads_A100_v4, family: StandardNCADSA100v4Family, cores: 24, memoryGib: 220,
   gpuType: A100-80GB, gpuCount: 1, gpuMemoryGib: 80, hourlyPrice: 2.5, currency: EUR}
- {name: my-l40s, family: L40S, cores: 16, memoryGib: 128, gpuType: L40S, gpuCount: 1,
   gpuMemoryGib: 48, hourlyPrice: 1.2, currency: EUR}
"#,
        )
        .expect("parse");
        let catalog = config.catalog();
        assert_eq!(
            catalog.instance_types["Standard_NC24ads_A100_v4"].hourly_price,
            2.5
        );
        assert_eq!(catalog.instance_types["my-l40s"].gpu_memory_gib, 48);
        assert_eq!(catalog.instance_types.len(), 9);
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = OperatorConfig::parse("surgeFactor: 0.5").expect_err("must fail");
        assert!(err.to_string().contains("surgeFactor"), "{err}");
        let err = OperatorConfig::parse("serverImagee: x").expect_err("must fail");
        assert!(err.to_string().contains("serverImagee"), "{err}");
    }
}
