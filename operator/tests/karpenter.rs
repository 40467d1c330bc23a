//! The Karpenter provider against real Karpenter (`sigs.k8s.io/karpenter` with its kwok cloud
//! provider, built by `scripts/build-karpenter.sh`) in the test control plane: the operator writes
//! a `karpenter.sh/v1` NodePool; Karpenter sees the server pods pending, launches NodeClaims of the
//! pool's instance type and creates their Nodes; kwok runs them; the scheduler places the servers
//! there. A missing Karpenter is reported first.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use llama_operator::api::LlamaDeployment;
use llama_operator::build::karpenter_node_pool_resource;
use llama_operator::catalog::default_instance_types;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use testenv::karpenter::{InstanceType, KarpenterProcess, instance_types_json};
use testenv::{FIELD_MANAGER, OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");
const FIRST: &str = "Standard_NC40ads_H100_v5";
const SECOND: &str = "Standard_NC80adis_H100_v5";
/// In the operator's catalog, but not offered to Karpenter.
const NOT_OFFERED: &str = "Standard_ND96isr_H100_v5";

fn reason(ld: &LlamaDeployment, type_: &str) -> Option<(String, String)> {
    testenv::llama::condition(ld, type_).map(|(_, reason, message)| (reason, message))
}

fn spec(instance_type: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_yaml::from_str(&format!(
        "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: kp}}\nspec:\n  model: Meta-Llama-3.1-8B-Instruct\n  source: {{type: demo}}\n  compute: {{instanceType: {instance_type}, instanceCount: 2}}\n  nodePool: {{provider: karpenter}}\n"
    ))?)
}

fn node_claim_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"),
        "nodeclaims",
    )
}

/// The objects of `api` with the labels of `selector`; None when the list call fails.
async fn labelled<K>(api: &Api<K>, selector: &str) -> Option<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Some(
        api.list(&ListParams::default().labels(selector))
            .await
            .ok()?
            .items,
    )
}

/// The nodes of the deployment's pools that are Ready and registered by Karpenter (its
/// `karpenter.sh/unregistered` taint removed, the NodePool's taints in place), by name, with
/// their instance types.
async fn ready_nodes(nodes: &Api<Node>, selector: &str) -> Vec<(String, String)> {
    let Ok(list) = nodes.list(&ListParams::default().labels(selector)).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter(|n| {
            let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref());
            taints.is_some_and(|t| t.iter().all(|t| t.key != "karpenter.sh/unregistered"))
        })
        .map(|n| {
            let it = n
                .labels()
                .get("node.kubernetes.io/instance-type")
                .cloned()
                .unwrap_or_default();
            (n.name_any(), it)
        })
        .collect()
}

/// The nodes the deployment's running server pods are on.
async fn server_nodes(pods: &Api<Pod>) -> BTreeSet<String> {
    let Ok(list) = pods
        .list(&ListParams::default().labels(&llama_operator::build::selector_string("kp")))
        .await
    else {
        return BTreeSet::new();
    };
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec?.node_name)
        .collect()
}

#[tokio::test]
async fn real_karpenter_provisions_gpu_nodes_for_the_pool_moves_them_and_releases_them()
-> anyhow::Result<()> {
    let env = TestEnv::new("karpenter").await?;
    env.install_crds().await?;
    let config = env.plane.dir.join(format!("config-{}.yaml", env.namespace));
    std::fs::write(
        &config,
        "karpenter: {nodeClassGroup: karpenter.kwok.sh, nodeClassKind: KWOKNodeClass, nodeClassName: default}\n",
    )?;
    let config_arg = config.to_string_lossy().into_owned();
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &["--config", &config_arg])?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    api.patch(
        "kp",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&spec(FIRST)?),
    )
    .await?;

    // Without Karpenter the deployment says so.
    let (_, message) = wait_for(Duration::from_secs(30), || async {
        reason(&api.get("kp").await.ok()?, "Ready").filter(|r| r.0 == "NodePoolProviderUnavailable")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePoolProviderUnavailable: {e}\n{}", op.log_text()))?;
    assert!(
        message.contains("karpenter.sh/v1 NodePool API is not installed"),
        "{message}"
    );

    // Install Karpenter: its CRDs, and the controller offering the catalog's instance types
    // (cores, memory and GPUs as the operator knows them) but one, as a cloud without it.
    let names = testenv::install_crds_from(&env.client, &testenv::karpenter::crds_dir()?).await?;
    assert!(
        names.contains(&"nodepools.karpenter.sh".to_owned()),
        "{names:?}"
    );
    let catalog = default_instance_types();
    let offered: Vec<InstanceType<'_>> = catalog
        .iter()
        .filter(|t| t.name != NOT_OFFERED)
        .map(|t| InstanceType {
            name: &t.name,
            cpu: t.cores,
            memory_gib: t.memory_gib,
            gpus: t.gpu_count,
            hourly_price: t.hourly_price,
        })
        .collect();
    let karpenter = KarpenterProcess::start(&env, &instance_types_json(&offered))?;
    let logs = || {
        format!(
            "operator log:\n{}\nkarpenter log ({}):\n{}",
            op.log_text(),
            karpenter.log_path().display(),
            tail(&karpenter.log_text(), 60)
        )
    };

    // Any change of the LlamaDeployment triggers a new reconcile at once.
    let touch = serde_json::json!({"metadata": {"annotations": {"test/touch": "1"}}});
    api.patch("kp", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    let pools: Api<DynamicObject> =
        Api::all_with(env.client.clone(), &karpenter_node_pool_resource());
    let selector = format!(
        "llama-operator.io/deployment-namespace={},llama-operator.io/deployment=kp",
        env.namespace
    );
    let pool = wait_for(Duration::from_secs(30), || async {
        labelled(&pools, &selector).await?.into_iter().next()
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePool: {e}\n{}", logs()))?;
    let first_pool = pool.name_any();
    let pool_spec = &pool.data["spec"];
    assert_eq!(
        pool_spec["template"]["spec"]["requirements"][0]["values"][0],
        FIRST
    );
    assert_eq!(pool_spec["limits"]["cpu"], "80");
    assert_eq!(pool_spec["limits"]["nvidia.com/gpu"], "2");
    // The API server defaulted fields of its own schema: proof it was validated as a NodePool.
    assert!(pool_spec["disruption"]["budgets"].is_array(), "{pool_spec}");

    // The node class the configuration names does not exist yet: Karpenter marks the NodePool
    // not ready, and the deployment says so, naming the configuration fields to fix.
    let (_, message) = wait_for(Duration::from_secs(60), || async {
        reason(&api.get("kp").await.ok()?, "NodePoolReady").filter(|r| r.0 == "NodePoolNotReady")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePoolNotReady: {e}\n{}", logs()))?;
    assert!(message.contains("NodeClassNotFound"), "{message}");
    assert!(message.contains("karpenter.nodeClassName"), "{message}");

    // Create the node class, ready.
    let classes: Api<DynamicObject> = Api::all_with(
        env.client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("karpenter.kwok.sh", "v1alpha1", "KWOKNodeClass"),
            "kwoknodeclasses",
        ),
    );
    let class: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass",
        "metadata": {"name": "default"}, "spec": {},
    }))?;
    classes
        .patch(
            "default",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&class),
        )
        .await?;
    // No controller reconciles KWOKNodeClass status (as in Karpenter's own kwok test setup).
    let ready = serde_json::json!({"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "Ready", "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1,
    }]}});
    classes
        .patch_status("default", &PatchParams::default(), &Patch::Merge(&ready))
        .await?;

    // Karpenter launches two NodeClaims of the instance type; their Nodes carry the pool's
    // labels, taints and the instance type's resources.
    let nodes: Api<Node> = Api::all(env.client.clone());
    let first_nodes = wait_for(Duration::from_secs(120), || async {
        let ready = ready_nodes(&nodes, &selector).await;
        (ready.len() == 2).then_some(ready)
    })
    .await
    .map_err(|e| anyhow::anyhow!("Karpenter brought no 2 Ready nodes: {e}\n{}", logs()))?;
    for (name, it) in &first_nodes {
        assert_eq!(it, FIRST, "{name}");
        let node = nodes.get(name).await?;
        // Karpenter's kwok provider sets a Node's allocatable from the instance type (less
        // Karpenter's 100m / 10Mi kube-reserved) and its capacity from the NodeClaim's requests.
        let status = node.status.clone().unwrap_or_default();
        let allocatable = status.allocatable.unwrap_or_default();
        assert_eq!(allocatable["cpu"].0, "39900m", "{name}");
        assert_eq!(allocatable["nvidia.com/gpu"].0, "1", "{name}");
        assert_eq!(
            allocatable["memory"].0,
            format!("{}Mi", 320 * 1024 - 10),
            "{name}"
        );
        assert_eq!(
            node.labels().get("karpenter.sh/nodepool"),
            Some(&first_pool),
            "{name}"
        );
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        assert!(
            taints
                .iter()
                .any(|t| t.key == "nvidia.com/gpu" && t.effect == "NoSchedule"),
            "{name}: {taints:?}"
        );
    }
    let claims: Api<DynamicObject> = Api::all_with(env.client.clone(), &node_claim_resource());
    let first_claims = claims
        .list(&ListParams::default().labels(&format!("karpenter.sh/nodepool={first_pool}")))
        .await?
        .items;
    assert_eq!(first_claims.len(), 2, "{}", logs());

    // The servers run on those nodes, and only there; the deployment becomes Ready.
    let ld = testenv::llama::wait_ready(&env, &op, "kp", 120).await?;
    let status = ld.status.clone().unwrap_or_default();
    assert_eq!(status.instances.as_ref().map(|i| i.ready), Some(2));
    assert!(
        status
            .endpoint
            .as_deref()
            .is_some_and(|e| e.contains("kp.")),
        "{status:?}"
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let on = server_nodes(&pods).await;
    let first_names: BTreeSet<String> = first_nodes.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(on, first_names, "servers are on the pool's nodes only");

    // An instance type Karpenter cannot launch: the deployment says why, from Karpenter's own
    // FailedScheduling Event, and no NodeClaim is made for it.
    let absent = spec(NOT_OFFERED)?
        .to_string()
        .replace("\"name\":\"kp\"", "\"name\":\"absent\"");
    let absent: serde_json::Value = serde_json::from_str(&absent)?;
    api.patch(
        "absent",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&absent),
    )
    .await?;
    let (_, message) = wait_for(Duration::from_secs(90), || async {
        reason(&api.get("absent").await.ok()?, "NodePoolReady")
            .filter(|r| r.0 == "NoMatchingCapacity")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NoMatchingCapacity: {e}\n{}", logs()))?;
    assert!(message.contains("Failed to schedule pod"), "{message}");
    api.delete("absent", &DeleteParams::default()).await?;

    // A new instance type: a new NodePool and nodes of that type; the servers move; the old pool
    // and its nodes are released.
    api.patch(
        "kp",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&spec(SECOND)?),
    )
    .await?;
    let moved = wait_for(Duration::from_secs(180), || async {
        let ready = ready_nodes(&nodes, &selector).await;
        let on = server_nodes(&pods).await;
        let old_pool_gone = pools.get_opt(&first_pool).await.ok()?.is_none();
        let all_second = ready.len() == 2 && ready.iter().all(|(_, it)| it == SECOND);
        let servers_there = on.len() == 2 && on.iter().all(|n| ready.iter().any(|r| &r.0 == n));
        let old_claims_gone = labelled(&claims, &format!("karpenter.sh/nodepool={first_pool}"))
            .await?
            .is_empty();
        (old_pool_gone && all_second && servers_there && old_claims_gone).then_some(ready)
    })
    .await
    .map_err(|e| anyhow::anyhow!("servers did not move to {SECOND}: {e}\n{}", logs()))?;
    assert!(moved.iter().all(|(n, _)| !first_names.contains(n)));
    let ld = testenv::llama::wait_ready(&env, &op, "kp", 60).await?;
    assert_eq!(
        ld.status.and_then(|s| s.instances).map(|i| i.ready),
        Some(2)
    );

    // Delete: the NodePool goes, and Karpenter removes its NodeClaims and Nodes.
    api.delete("kp", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(120), || async {
        let gone = api.get_opt("kp").await.ok()?.is_none();
        let no_pools = labelled(&pools, &selector).await?.is_empty();
        let no_nodes = labelled(&nodes, &selector).await?.is_empty();
        let no_claims = labelled(&claims, &selector).await?.is_empty();
        (gone && no_pools && no_nodes && no_claims).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("pool not released: {e}\n{}", logs()))?;

    // Two instances of each instance type were launched and terminated, and nothing more: no
    // create/delete loop. Karpenter logs a deletion once its finalizer is gone, which can come
    // a moment after the objects have disappeared: wait for the log to catch up.
    let count = |what: &str| {
        let log = karpenter.log_text();
        log.matches(&format!("\"message\":\"{what}\"")).count()
    };
    let _ = wait_for(Duration::from_secs(15), || async {
        (count("deleted nodeclaim") >= 4).then_some(())
    })
    .await;
    assert_eq!(count("created nodeclaim"), 4, "{}", logs());
    assert_eq!(count("registered nodeclaim"), 4, "{}", logs());
    assert_eq!(count("deleted nodeclaim"), 4, "{}", logs());
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
