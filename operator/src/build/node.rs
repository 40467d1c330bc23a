//! A simulated GPU node of a kwok node pool: one per instance.

use super::{
    BuildError, DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL, POOL_LABEL, POOL_TAINT,
    from_json, name_of,
};
use crate::api::LlamaDeployment;
use crate::validate::Plan;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

/// Label on nodes the operator itself created for a kwok pool (and so may delete).
pub const KWOK_PROVISIONER_LABEL: &str = "llama-operator.io/provisioner";

/// Name of instance `index` of a pool.
pub fn kwok_node_name(pool: &str, index: i32) -> String {
    format!("llama-{pool}-{index}")
}

/// Node `index` of the deployment's pool, with the instance type's capacity, marked for kwok.
/// Nodes are cluster-scoped, so they carry labels instead of an owner reference and are removed
/// by the operator's finalizer.
pub fn kwok_node(
    ld: &LlamaDeployment,
    plan: &Plan,
    pool: &str,
    index: i32,
) -> Result<Node, BuildError> {
    let (name, namespace) = name_of(ld)?;
    let it = &plan.instance;
    let mut labels = serde_json::Map::new();
    for (k, v) in &ld.spec.node_pool.node_selector {
        labels.insert(k.clone(), json!(v));
    }
    for (k, v) in [
        (POOL_LABEL, pool.to_owned()),
        (DEPLOYMENT_NAME_LABEL, name.clone()),
        (DEPLOYMENT_NAMESPACE_LABEL, namespace),
        ("node.kubernetes.io/instance-type", it.name.clone()),
        ("nvidia.com/gpu.product", it.gpu_type.clone()),
        ("nvidia.com/gpu.count", it.gpu_count.to_string()),
        ("kubernetes.io/os", "linux".into()),
        ("kubernetes.io/arch", "amd64".into()),
        ("kubernetes.io/hostname", kwok_node_name(pool, index)),
        ("type", "kwok".into()),
        (KWOK_PROVISIONER_LABEL, "kwok".into()),
    ] {
        labels.insert(k.to_owned(), json!(v));
    }
    let capacity = json!({
        "cpu": it.cores.to_string(),
        "memory": format!("{}Gi", it.memory_gib),
        "nvidia.com/gpu": it.gpu_count.to_string(),
        "pods": "110",
    });
    from_json(
        "Node",
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": kwok_node_name(pool, index),
                "labels": labels,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            },
            "spec": {
                "taints": [
                    {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                    {"key": POOL_TAINT, "value": pool, "effect": "NoSchedule"},
                ],
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    #[test]
    fn node_has_instance_capacity_pool_label_and_taints() {
        let d = ld(CHAT);
        let node = kwok_node(&d, &plan(&d), "chat-0123456789", 1).expect("node");
        let yaml = serde_yaml::to_value(&node).expect("yaml");
        let want: serde_yaml::Value = serde_yaml::from_str(
            r#"
name: llama-chat-0123456789-1
labels:
  llama-operator.io/pool: chat-0123456789
  llama-operator.io/deployment: chat
  llama-operator.io/deployment-namespace: team-a
  node.kubernetes.io/instance-type: Standard_NC48ads_A100_v4
  nvidia.com/gpu.product: A100-80GB
  nvidia.com/gpu.count: "2"
  kubernetes.io/os: linux
  kubernetes.io/arch: amd64
  kubernetes.io/hostname: llama-chat-0123456789-1
  type: kwok
  llama-operator.io/provisioner: kwok
  team: a
annotations: {kwok.x-k8s.io/node: fake}
"#,
        )
        .expect("yaml");
        assert_eq!(yaml["metadata"], want);
        assert_eq!(yaml["status"]["capacity"]["cpu"], "48");
        assert_eq!(yaml["status"]["capacity"]["memory"], "440Gi");
        assert_eq!(yaml["status"]["capacity"]["nvidia.com/gpu"], "2");
        let taints = &yaml["spec"]["taints"];
        assert_eq!(taints[1]["key"], "llama-operator.io/pool");
        assert_eq!(taints[1]["value"], "chat-0123456789");
    }
}
