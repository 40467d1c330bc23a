//! A Karpenter `karpenter.sh/v1` NodePool for one deployment: only its instance type, labelled
//! and tainted for its servers, limited to what its instances need.

use super::{
    BuildError, DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL, POOL_LABEL, POOL_TAINT, name_of,
};
use crate::api::LlamaDeployment;
use crate::config::KarpenterConfig;
use crate::validate::Plan;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

/// The NodePool API (cluster-scoped).
pub fn karpenter_node_pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"),
        "nodepools",
    )
}

/// The NodeClaim API (cluster-scoped): Karpenter's record of each node it launches for a NodePool.
pub fn karpenter_node_claim_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"),
        "nodeclaims",
    )
}

/// Name of a pool's NodePool.
pub fn karpenter_node_pool_name(pool: &str) -> String {
    format!("llama-{pool}")
}

pub fn karpenter_node_pool(
    ld: &LlamaDeployment,
    plan: &Plan,
    pool: &str,
    karpenter: &KarpenterConfig,
) -> Result<DynamicObject, BuildError> {
    let (name, namespace) = name_of(ld)?;
    let it = &plan.instance;
    let instances = i64::from(plan.instances.max(0));
    let mut node_labels = serde_json::Map::new();
    for (k, v) in &ld.spec.node_pool.node_selector {
        node_labels.insert(k.clone(), json!(v));
    }
    node_labels.insert(POOL_LABEL.into(), json!(pool));
    node_labels.insert(DEPLOYMENT_NAME_LABEL.into(), json!(name));
    node_labels.insert(DEPLOYMENT_NAMESPACE_LABEL.into(), json!(namespace));
    serde_json::from_value(json!({
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {
            "name": karpenter_node_pool_name(pool),
            "labels": {
                POOL_LABEL: pool,
                DEPLOYMENT_NAME_LABEL: name,
                DEPLOYMENT_NAMESPACE_LABEL: namespace,
                "app.kubernetes.io/managed-by": "llama-operator",
            },
        },
        "spec": {
            "template": {
                "metadata": {"labels": node_labels},
                "spec": {
                    "nodeClassRef": {
                        "group": karpenter.node_class_group,
                        "kind": karpenter.node_class_kind,
                        "name": karpenter.node_class_name,
                    },
                    "requirements": [
                        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [it.name]},
                        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                    ],
                    "taints": [
                        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                        {"key": POOL_TAINT, "value": pool, "effect": "NoSchedule"},
                    ],
                    // GPU servers hold loaded models: never recycle them on a timer.
                    "expireAfter": "Never",
                },
            },
            // Never more than the deployment's instances (quota is counted in the same cores).
            "limits": {
                "cpu": (i64::from(it.cores) * instances).to_string(),
                "nvidia.com/gpu": (i64::from(it.gpu_count) * instances).to_string(),
            },
            // Release nodes emptied by a scale-down; never move running servers to consolidate.
            "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": "5m"},
        },
    }))
    .map_err(|source| BuildError::Serde { kind: "NodePool", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    #[test]
    fn node_pool_is_restricted_to_the_instance_type_and_limited() {
        let d = ld(&CHAT.replace("provider: kwok", "provider: karpenter"));
        let np = karpenter_node_pool(
            &d,
            &plan(&d),
            "chat-0123456789",
            &KarpenterConfig::default(),
        )
        .expect("nodepool");
        let spec = &np.data["spec"];
        assert_eq!(np.metadata.name.as_deref(), Some("llama-chat-0123456789"));
        assert_eq!(
            spec["template"]["spec"]["requirements"][0]["values"][0],
            "Standard_NC48ads_A100_v4"
        );
        assert_eq!(
            spec["template"]["spec"]["nodeClassRef"]["kind"],
            "AKSNodeClass"
        );
        assert_eq!(
            spec["template"]["metadata"]["labels"]["llama-operator.io/pool"],
            "chat-0123456789"
        );
        assert_eq!(spec["template"]["metadata"]["labels"]["team"], "a");
        assert_eq!(spec["limits"]["cpu"], "96");
        assert_eq!(spec["limits"]["nvidia.com/gpu"], "4");
        assert_eq!(
            spec["template"]["spec"]["taints"][1]["value"],
            "chat-0123456789"
        );
    }
}
