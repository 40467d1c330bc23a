//! A simulated GPU node of a kwok node pool: one per instance.

use super::{
    BuildError, DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL, POOL_LABEL, POOL_TAINT,
    from_json, name_of,
};
use crate::api::LlamaDeployment;
use crate::validate::Plan;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use std::collections::BTreeSet;

/// Label on nodes the operator itself created for a kwok pool (and so may delete).
pub const KWOK_PROVISIONER_LABEL: &str = "llama-operator.io/provisioner";

/// Name of instance `index` of a pool.
pub fn kwok_node_name(pool: &str, index: i32) -> String {
    format!("llama-{pool}-{index}")
}

/// The index in a node name of `pool`, if the name is one of its nodes.
fn kwok_node_index(pool: &str, name: &str) -> Option<i32> {
    name.strip_prefix(&format!("llama-{pool}-"))?.parse().ok()
}

/// The node indices a kwok pool keeps for `instances` instances: every node of the pool that
/// holds a server pod (a scale-down releases only nodes its pods have left), then the pool's
/// empty nodes, then new indices, lowest first, until there are `instances`.
pub fn kwok_pool_indices(
    pool: &str,
    instances: i32,
    existing: &[String],
    occupied: &BTreeSet<String>,
) -> BTreeSet<i32> {
    let want = usize::try_from(instances).unwrap_or(0);
    let mut keep: BTreeSet<i32> = occupied
        .iter()
        .filter_map(|n| kwok_node_index(pool, n))
        .collect();
    let mut empty: Vec<i32> = existing
        .iter()
        .filter(|n| !occupied.contains(*n))
        .filter_map(|n| kwok_node_index(pool, n))
        .collect();
    empty.sort_unstable();
    let mut empty = empty.into_iter();
    let mut next = 0;
    while keep.len() < want {
        let index = match empty.next() {
            Some(i) => i,
            None => {
                while keep.contains(&next) || existing.contains(&kwok_node_name(pool, next)) {
                    next += 1;
                }
                next
            }
        };
        keep.insert(index);
    }
    keep
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

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pool_indices_keep_occupied_nodes_and_fill_lowest_first() {
        let empty = BTreeSet::new();
        assert_eq!(
            kwok_pool_indices("p", 3, &[], &empty),
            BTreeSet::from([0, 1, 2])
        );
        // Scale-down from 3 to 1 while the pods on 0 and 2 terminate: nothing occupied goes.
        let existing = names(&["llama-p-0", "llama-p-1", "llama-p-2"]);
        let busy: BTreeSet<String> = names(&["llama-p-0", "llama-p-2"]).into_iter().collect();
        assert_eq!(
            kwok_pool_indices("p", 1, &existing, &busy),
            BTreeSet::from([0, 2])
        );
        // Once only the pod on 1 remains, the others are released.
        let busy: BTreeSet<String> = names(&["llama-p-1"]).into_iter().collect();
        assert_eq!(
            kwok_pool_indices("p", 1, &existing, &busy),
            BTreeSet::from([1])
        );
        // Scale-up reuses empty nodes before adding new indices; other pools' nodes are ignored.
        let existing = names(&["llama-p-1", "llama-p-4", "llama-q-0"]);
        let busy: BTreeSet<String> = names(&["llama-p-4", "llama-q-0"]).into_iter().collect();
        assert_eq!(
            kwok_pool_indices("p", 4, &existing, &busy),
            BTreeSet::from([0, 1, 2, 4])
        );
    }

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
