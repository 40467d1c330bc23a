//! The control plane itself: every component is up and simulated GPU nodes work.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use std::time::Duration;
use testenv::{TestEnv, wait_for};

#[tokio::test]
async fn kwok_node_becomes_ready_and_scheduler_binds_pods_to_it() -> anyhow::Result<()> {
    let env = TestEnv::new("kwok-node").await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let node_name = format!("{}-gpu-0", env.namespace);
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node_name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"type": "kwok", "llama-operator.io/test": env.namespace}
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"},
            "allocatable": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"}
        }
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    wait_for(Duration::from_secs(30), || async {
        let node = nodes.get(&node_name).await.ok()?;
        let ready = node
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("kwok did not make node {node_name} Ready: {e}"))?;

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "gpu-user"},
        "spec": {
            "nodeSelector": {"llama-operator.io/test": env.namespace},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{
                "name": "c", "image": "example.invalid/none",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}
            }]
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let (bound_to, phase) = wait_for(Duration::from_secs(30), || async {
        let pod = pods.get("gpu-user").await.ok()?;
        let node = pod.spec?.node_name?;
        let phase = pod.status?.phase?;
        (phase == "Running").then_some((node, phase))
    })
    .await
    .map_err(|e| anyhow::anyhow!("pod was not scheduled and run on the kwok node: {e}"))?;
    assert_eq!(bound_to, node_name);
    assert_eq!(phase, "Running");

    // A second pod asking for the same GPU cannot fit: the scheduler must leave it Pending.
    let mut second = pod.clone();
    second.metadata.name = Some("gpu-user-2".into());
    pods.create(&PostParams::default(), &second).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = pods.get("gpu-user-2").await?;
    assert_eq!(
        second.spec.and_then(|s| s.node_name),
        None,
        "only one GPU exists on the node"
    );
    Ok(())
}

#[tokio::test]
async fn components_report_healthy() -> anyhow::Result<()> {
    let env = TestEnv::new("health").await?;
    let out = env.run_kubectl(&["get", "--raw", "/readyz?verbose"], None)?;
    assert!(out.success, "readyz failed: {}", out.stderr);
    assert!(out.stdout.contains("readyz check passed"), "{}", out.stdout);
    // The controller-manager runs: it creates the default ServiceAccount in new namespaces.
    wait_for(Duration::from_secs(30), || async {
        let out = env
            .run_kubectl(&["get", "serviceaccount", "default", "-o", "name"], None)
            .ok()?;
        out.success.then_some(())
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!("controller-manager did not create the default ServiceAccount: {e}")
    })?;
    Ok(())
}
