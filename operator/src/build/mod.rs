//! Desired objects, built from a valid spec by pure functions (no client): one file per object.

mod config_map;
mod deployment;
mod karpenter_node_pool;
mod labels;
mod node;
mod pdb;
mod secret;
mod service;

pub use config_map::server_config_map;
pub use deployment::{FETCH_CONTAINER, HF_TOKEN_DEFAULT_KEY, SERVER_CONTAINER, server_deployment};
pub use karpenter_node_pool::{
    karpenter_node_claim_resource, karpenter_node_pool, karpenter_node_pool_name,
    karpenter_node_pool_resource,
};
pub use labels::{
    DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL, POOL_LABEL, POOL_TAINT, pod_labels, pool_id,
    selector_labels, selector_string,
};
pub use node::{KWOK_PROVISIONER_LABEL, kwok_node, kwok_node_name, kwok_pool_indices};
pub use pdb::server_pdb;
pub use secret::{KeyPair, generated_keys_secret, generated_secret_name};
pub use service::{endpoint_url, server_service};

use crate::api::LlamaDeployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

/// Why an object could not be built (a bug, not a user error: the spec was validated).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("LlamaDeployment has no {0}")]
    MissingMetadata(&'static str),
    #[error("cannot build {kind}: {source}")]
    Serde {
        kind: &'static str,
        source: serde_json::Error,
    },
}

/// The owner reference that makes a child garbage-collected with its LlamaDeployment.
pub fn owner(ld: &LlamaDeployment) -> Result<OwnerReference, BuildError> {
    ld.controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.uid"))
}

/// Metadata of a namespaced child: its name, the deployment's namespace and labels, and the
/// owner reference that garbage-collects it with the deployment.
fn child_metadata(ld: &LlamaDeployment, child_name: &str) -> Result<serde_json::Value, BuildError> {
    let (name, namespace) = name_of(ld)?;
    Ok(serde_json::json!({
        "name": child_name,
        "namespace": namespace,
        "labels": pod_labels(ld, &name),
        "ownerReferences": [owner(ld)?],
    }))
}

fn name_of(ld: &LlamaDeployment) -> Result<(String, String), BuildError> {
    let name = ld
        .metadata
        .name
        .clone()
        .ok_or(BuildError::MissingMetadata("metadata.name"))?;
    let ns = ld
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    Ok((name, ns))
}

fn from_json<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    value: serde_json::Value,
) -> Result<T, BuildError> {
    serde_json::from_value(value).map_err(|source| BuildError::Serde { kind, source })
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::api::LlamaDeployment;
    use crate::config::OperatorConfig;
    use crate::validate::{Plan, References, validate};

    /// A LlamaDeployment from YAML, as the API server would return it (uid set).
    pub fn ld(yaml: &str) -> LlamaDeployment {
        let mut ld: LlamaDeployment = serde_yaml::from_str(yaml).expect("test YAML");
        ld.metadata.uid = Some("0f2d7a4e-0000-4000-8000-000000000001".into());
        ld
    }

    pub fn plan(ld: &LlamaDeployment) -> Plan {
        validate(
            ld,
            &OperatorConfig::default().catalog(),
            &References::default(),
        )
        .expect("valid")
    }

    pub const CHAT: &str = "
apiVersion: llama-operator.io/v1alpha1
kind: LlamaDeployment
metadata: {name: chat, namespace: team-a}
spec:
  model: Meta-Llama-3.1-8B-Instruct
  source: {type: demo}
  compute: {instanceType: Standard_NC48ads_A100_v4, instanceCount: 2}
  nodePool: {provider: kwok, nodeSelector: {team: a}}
";
}
