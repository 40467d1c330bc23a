//! The operator on the real control plane with kwok GPU nodes: apply → nodes → pods → Ready,
//! instance-type change, delete, bad specs, and a crash in the middle of a reconcile.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams};
use llama_operator::api::LlamaDeployment;
use std::path::Path;
use std::time::Duration;
use testenv::llama::{apply, condition, wait_ready};
use testenv::{OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

async fn setup(name: &str) -> anyhow::Result<(TestEnv, OperatorProcess)> {
    let env = TestEnv::new(name).await?;
    env.install_crds().await?;
    let operator = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    Ok((env, operator))
}

async fn nodes_of(env: &TestEnv, name: &str) -> anyhow::Result<Vec<Node>> {
    let sel = format!(
        "llama-operator.io/deployment-namespace={},llama-operator.io/deployment={name}",
        env.namespace
    );
    Ok(Api::<Node>::all(env.client.clone())
        .list(&ListParams::default().labels(&sel))
        .await?
        .items)
}

/// The Secrets, ConfigMaps, Services and PodDisruptionBudgets of the test namespace that a
/// LlamaDeployment owns or that carry the operator's deployment label, as `Kind/name`.
async fn namespaced_children(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    fn ours(kind: &str, meta: &kube::api::ObjectMeta) -> Option<String> {
        let owned = meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "LlamaDeployment");
        let labelled = meta
            .labels
            .iter()
            .flatten()
            .any(|(k, _)| k.starts_with("llama-operator.io/"));
        (owned || labelled).then(|| format!("{kind}/{}", meta.name.as_deref().unwrap_or("?")))
    }
    let lp = ListParams::default();
    let ns = &env.namespace;
    let client = &env.client;
    let mut found = Vec::new();
    for s in Api::<Secret>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
    {
        found.extend(ours("Secret", &s.metadata));
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
    {
        found.extend(ours("ConfigMap", &c.metadata));
    }
    for s in Api::<Service>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
    {
        found.extend(ours("Service", &s.metadata));
    }
    for p in Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
    {
        found.extend(ours("PodDisruptionBudget", &p.metadata));
    }
    found.sort();
    Ok(found)
}

async fn pods_of(env: &TestEnv, name: &str) -> anyhow::Result<Vec<Pod>> {
    let sel = format!("llama-operator.io/deployment={name}");
    Ok(Api::<Pod>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default().labels(&sel))
        .await?
        .items)
}

const TWO_A100X2: &str = "  model: Meta-Llama-3.1-8B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC48ads_A100_v4, instanceCount: 2}\n  nodePool: {provider: kwok}\n";

#[tokio::test]
async fn apply_becomes_ready_on_its_own_gpu_nodes_and_delete_leaves_nothing() -> anyhow::Result<()>
{
    let (env, op) = setup("lifecycle").await?;
    apply(&env, "chat", TWO_A100X2).await?;
    let ld = wait_ready(&env, &op, "chat", 90).await?;

    // Once Ready and running, the operator leaves the object alone (no status-write loop): the
    // next write is the cost checkpoint, a minute later.
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = api.get("chat").await?.metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        api.get("chat").await?.metadata.resource_version,
        settled,
        "status rewritten in a loop\n{}",
        op.log_text()
    );
    let reconciles = op.log_text().matches("reconciling").count();
    assert!(
        reconciles < 40,
        "{reconciles} reconciles for one deployment"
    );

    let status = ld.status.clone().unwrap_or_default();
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("http://chat.{}.svc", env.namespace).as_str())
    );
    let inst = status.instances.clone().unwrap_or_default();
    assert_eq!((inst.desired, inst.ready), (2, 2));
    assert_eq!(status.observed_generation, ld.metadata.generation);
    assert_eq!(
        condition(&ld, "NodePoolReady").map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(
        condition(&ld, "ModelLoaded").map(|c| c.0),
        Some("True".into())
    );

    // The namespaced children, as the bad-spec test looks for them.
    assert_eq!(
        namespaced_children(&env).await?,
        [
            "ConfigMap/chat-server",
            "PodDisruptionBudget/chat",
            "Secret/chat-keys",
            "Service/chat"
        ]
    );

    // Two nodes with the instance type's capacity, and the servers run on them and only them.
    let nodes = nodes_of(&env, "chat").await?;
    assert_eq!(nodes.len(), 2);
    let mut node_names = Vec::new();
    for node in &nodes {
        let cap = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.clone())
            .unwrap_or_default();
        assert_eq!(cap.get("cpu").map(|q| q.0.as_str()), Some("48"));
        assert_eq!(cap.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("2"));
        assert_eq!(cap.get("memory").map(|q| q.0.as_str()), Some("440Gi"));
        node_names.push(node.metadata.name.clone().unwrap_or_default());
    }
    let pods = pods_of(&env, "chat").await?;
    assert_eq!(pods.len(), 2);
    let mut used: Vec<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    used.sort();
    node_names.sort();
    assert_eq!(used, node_names, "one server per pool node");

    // The endpoint's objects exist, the keys are two 32-character strings.
    let ns = &env.namespace;
    let secret = Api::<Secret>::namespaced(env.client.clone(), ns)
        .get("chat-keys")
        .await?;
    let data = secret.data.unwrap_or_default();
    assert_eq!(data.get("primaryKey").map(|k| k.0.len()), Some(32));
    assert_ne!(data.get("primaryKey"), data.get("secondaryKey"));
    Api::<Service>::namespaced(env.client.clone(), ns)
        .get("chat")
        .await?;
    Api::<ConfigMap>::namespaced(env.client.clone(), ns)
        .get("chat-server")
        .await?;
    Api::<PodDisruptionBudget>::namespaced(env.client.clone(), ns)
        .get("chat")
        .await?;

    // Events tell the story.
    let events = env.run_kubectl(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=chat",
            "-o",
            "custom-columns=R:.reason",
        ],
        None,
    )?;
    assert!(events.stdout.contains("Ready"), "{}", events.stdout);

    // Delete: nodes released by the finalizer, everything else garbage-collected.
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), ns);
    api.delete("chat", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), || async {
        let gone = api.get_opt("chat").await.ok()?.is_none();
        let nodes = nodes_of(&env, "chat").await.ok()?.is_empty();
        let deployments = Api::<Deployment>::namespaced(env.client.clone(), ns)
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty();
        let secrets = Api::<Secret>::namespaced(env.client.clone(), ns)
            .get_opt("chat-keys")
            .await
            .ok()?
            .is_none();
        let services = Api::<Service>::namespaced(env.client.clone(), ns)
            .get_opt("chat")
            .await
            .ok()?
            .is_none();
        let cms = Api::<ConfigMap>::namespaced(env.client.clone(), ns)
            .get_opt("chat-server")
            .await
            .ok()?
            .is_none();
        let pdbs = Api::<PodDisruptionBudget>::namespaced(env.client.clone(), ns)
            .get_opt("chat")
            .await
            .ok()?
            .is_none();
        (gone && nodes && deployments && secrets && services && cms && pdbs).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("children left after delete: {e}\n{}", op.log_text()))?;
    Ok(())
}

#[tokio::test]
async fn changing_instance_type_moves_pods_to_a_new_pool_and_releases_the_old() -> anyhow::Result<()>
{
    let (env, op) = setup("instance-type").await?;
    apply(&env, "mover", TWO_A100X2).await?;
    wait_ready(&env, &op, "mover", 90).await?;
    let old: Vec<String> = nodes_of(&env, "mover")
        .await?
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();

    apply(
        &env,
        "mover",
        &TWO_A100X2.replace("Standard_NC48ads_A100_v4", "Standard_NC40ads_H100_v5"),
    )
    .await?;
    wait_for(Duration::from_secs(120), || async {
        let nodes = nodes_of(&env, "mover").await.ok()?;
        let all_new = nodes.len() == 2
            && nodes.iter().all(|n| {
                n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("node.kubernetes.io/instance-type"))
                    .map(String::as_str)
                    == Some("Standard_NC40ads_H100_v5")
            });
        let pods = pods_of(&env, "mover").await.ok()?;
        let on_new = pods.len() == 2
            && pods.iter().all(|p| {
                let n = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                nodes
                    .iter()
                    .any(|node| node.metadata.name.as_deref() == Some(n.as_str()))
            });
        (all_new && on_new).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("pool did not move: {e}\n{}", op.log_text()))?;
    let ld = wait_ready(&env, &op, "mover", 60).await?;
    assert_eq!(
        condition(&ld, "NodePoolReady")
            .map(|c| c.2)
            .unwrap_or_default(),
        "2 node(s) of Standard_NC40ads_H100_v5 available"
    );
    let nodes = Api::<Node>::all(env.client.clone());
    for name in old {
        assert!(
            nodes.get_opt(&name).await?.is_none(),
            "old pool node {name} still exists"
        );
    }
    Ok(())
}

#[tokio::test]
async fn bad_specs_get_a_condition_and_create_nothing() -> anyhow::Result<()> {
    let (env, op) = setup("bad-specs").await?;
    let cases = [
        (
            "unknown-type",
            "  model: Meta-Llama-3.2-1B\n  source: {type: demo}\n  compute: {instanceType: Standard_Nope}\n  nodePool: {provider: kwok}\n",
            "InstanceTypeUnknown",
            "spec.compute.instanceType",
        ),
        (
            "too-big",
            "  model: Meta-Llama-3.1-70B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4}\n  nodePool: {provider: kwok}\n",
            "ModelDoesNotFit",
            "Standard_NC96ads_A100_v4",
        ),
        (
            "no-secret",
            "  model: Meta-Llama-3.2-1B\n  source: {type: demo}\n  auth: {secretRef: {name: missing-keys}}\n  nodePool: {provider: kwok}\n",
            "SecretNotFound",
            "spec.auth.secretRef.name",
        ),
        (
            "no-pvc",
            "  model: Meta-Llama-3.2-1B\n  source: {type: pvc, pvc: {claimName: weights}}\n  nodePool: {provider: kwok}\n",
            "PersistentVolumeClaimNotFound",
            "spec.source.pvc.claimName",
        ),
        (
            "no-token",
            "  model: Meta-Llama-3.2-1B\n  source: {type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.2-1B, tokenSecretRef: {name: hf-token}}}\n  nodePool: {provider: kwok}\n",
            "SecretNotFound",
            "spec.source.huggingFace.tokenSecretRef.name: Secret \"hf-token\"",
        ),
        (
            "token-key",
            "  model: Meta-Llama-3.2-1B\n  source: {type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.2-1B, tokenSecretRef: {name: hf-other}}}\n  nodePool: {provider: kwok}\n",
            "SecretInvalid",
            "spec.source.huggingFace.tokenSecretRef.key: Secret \"hf-other\" has no non-empty key \"token\" (it has: hf_token)",
        ),
        (
            // This binary's control plane has no Karpenter: nothing may be created before that
            // is found out.
            "no-karpenter",
            "  model: Meta-Llama-3.2-1B\n  source: {type: demo}\n  nodePool: {provider: karpenter}\n",
            "NodePoolProviderUnavailable",
            "karpenter.sh/v1 NodePool API is not installed",
        ),
        (
            "gguf-as-safetensors",
            "  model: Meta-Llama-3.2-1B\n  source: {type: url, url: 'https://models.example/llama-1b-Q8_0.gguf'}\n  nodePool: {provider: kwok}\n",
            "SourceFormatMismatch",
            "set spec.source.format: gguf",
        ),
        (
            // 8B's 128 KiB a token: a million tokens (122 GiB) cannot sit beside the weights on
            // one A100 80 GB; the message gives the most that can.
            "kv-too-big",
            "  model: Meta-Llama-3.1-8B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4}\n  engine: {kvCacheTokens: 1000000}\n  nodePool: {provider: kwok}\n",
            "KvCacheDoesNotFit",
            "spec.engine.kvCacheTokens: 1000000 tokens of key/value cache (kvCacheDtype auto) need 122.07 GiB",
        ),
        (
            "vision",
            "  model: Llama-3.2-11B-Vision-Instruct\n  source: {type: url, url: 'https://models.example/llama-3.2-11b-vision.tar'}\n  nodePool: {provider: kwok}\n",
            "VisionModelUnsupported",
            "llama-server serves the text-only Llama 3.x models",
        ),
        (
            "window-too-long",
            "  model: Meta-Llama-3.2-1B\n  source: {type: demo}\n  engine: {contextLength: 262144}\n  nodePool: {provider: kwok}\n",
            "ContextLengthTooLong",
            "use at most 131072",
        ),
    ];
    // A token Secret under another key than the one referenced (`token` by default).
    let other: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-other"},
        "stringData": {"hf_token": "hf_secret_value"}
    }))?;
    Api::<Secret>::namespaced(env.client.clone(), &env.namespace)
        .create(&Default::default(), &other)
        .await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    for (name, body, reason, words) in cases {
        apply(&env, name, body).await?;
        let (status, got_reason, message) = wait_for(Duration::from_secs(30), || async {
            condition(&api.get(name).await.ok()?, "Ready").filter(|c| c.1 != "Provisioning")
        })
        .await
        .map_err(|e| anyhow::anyhow!("{name}: no condition: {e}\n{}", op.log_text()))?;
        assert_eq!(
            (status.as_str(), got_reason.as_str()),
            ("False", reason),
            "{name}: {message}"
        );
        assert!(message.contains(words), "{name}: {message}");
    }
    // Nothing was created for any of them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await?;
    assert!(deployments.items.is_empty(), "deployments were created");
    for (name, ..) in cases {
        assert!(
            nodes_of(&env, name).await?.is_empty(),
            "{name}: nodes were created"
        );
    }
    let children = namespaced_children(&env).await?;
    assert!(children.is_empty(), "children were created: {children:?}");
    // No retry loop: the invalid objects are not rewritten while nothing changes.
    let before: Vec<_> = futures::future::join_all(cases.iter().map(|(n, ..)| api.get(n))).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after: Vec<_> = futures::future::join_all(cases.iter().map(|(n, ..)| api.get(n))).await;
    for (b, a) in before.iter().zip(&after) {
        let (b, a) = (
            b.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
            a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        assert_eq!(
            b.metadata.resource_version, a.metadata.resource_version,
            "status rewritten in a loop"
        );
    }

    // Fixing a reference is noticed without touching the LlamaDeployment.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "missing-keys"},
        "stringData": {"primaryKey": "a".repeat(32), "secondaryKey": "b".repeat(32)}
    }))?;
    Api::<Secret>::namespaced(env.client.clone(), &env.namespace)
        .create(&Default::default(), &secret)
        .await?;
    wait_ready(&env, &op, "no-secret", 90).await?;
    Ok(())
}

#[tokio::test]
async fn operator_killed_mid_reconcile_converges_without_duplicates() -> anyhow::Result<()> {
    let (env, op) = setup("crash").await?;
    apply(
        &env,
        "crashy",
        &TWO_A100X2.replace("instanceCount: 2", "instanceCount: 3"),
    )
    .await?;
    // Kill it as soon as it has started creating children.
    wait_for(Duration::from_secs(30), || async {
        (!nodes_of(&env, "crashy").await.ok()?.is_empty()).then_some(())
    })
    .await?;
    op.kill();
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    wait_ready(&env, &op, "crashy", 90).await?;
    assert_eq!(nodes_of(&env, "crashy").await?.len(), 3);
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &env.namespace)
        .list(&ListParams::default())
        .await?;
    assert_eq!(deployments.items.len(), 1);
    assert_eq!(pods_of(&env, "crashy").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn existing_nodes_without_room_are_reported_not_retried() -> anyhow::Result<()> {
    let (env, op) = setup("existing").await?;
    // One existing GPU node of the right type (simulated by kwok, but not created by us).
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": format!("{}-existing-gpu", env.namespace),
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4", "pool": env.namespace.clone()}
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"},
                   "allocatable": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"}}
    }))?;
    let nodes = Api::<Node>::all(env.client.clone());
    nodes.create(&Default::default(), &node).await?;
    // The node lifecycle controller taints a new node `not-ready` until kwok reports it Ready; the
    // scheduler's message would then name that taint instead of the GPU shortage this test is about.
    let node_name = format!("{}-existing-gpu", env.namespace);
    wait_for(Duration::from_secs(60), || async {
        let node = nodes.get(&node_name).await.ok()?;
        let ready = node
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let only_gpu_taint = node
            .spec?
            .taints
            .unwrap_or_default()
            .iter()
            .all(|t| t.key == "nvidia.com/gpu");
        (ready && only_gpu_taint).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("existing node never became Ready: {e}"))?;
    let body = format!(
        "  model: Meta-Llama-3.2-1B-Instruct\n  source: {{type: demo}}\n  compute: {{instanceType: Standard_NC24ads_A100_v4, instanceCount: 2}}\n  nodePool: {{provider: existing, nodeSelector: {{pool: {}}}}}\n",
        env.namespace
    );
    apply(&env, "tight", &body).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let (_, reason, message) = wait_for(Duration::from_secs(60), || async {
        condition(&api.get("tight").await.ok()?, "Ready").filter(|c| c.1 == "InsufficientCapacity")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no InsufficientCapacity: {e}\n{}", op.log_text()))?;
    assert_eq!(reason, "InsufficientCapacity");
    assert!(
        message.contains("Standard_NC24ads_A100_v4") && message.contains("nvidia.com/gpu"),
        "{message}"
    );
    // One instance runs on the one node that has room; the other waits, reported.
    wait_for(Duration::from_secs(60), || async {
        let counts = api.get("tight").await.ok()?.status?.instances?;
        ((counts.desired, counts.ready) == (2, 1)).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("expected 1 of 2 ready: {e}\n{}", op.log_text()))?;
    // The operator created no nodes of its own, and leaves the existing one alone on delete.
    assert!(nodes_of(&env, "tight").await?.is_empty());
    api.delete("tight", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), || async {
        api.get_opt("tight").await.ok()?.is_none().then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("not deleted: {e}\n{}", op.log_text()))?;
    assert!(
        nodes
            .get_opt(&format!("{}-existing-gpu", env.namespace))
            .await?
            .is_some()
    );
    Ok(())
}

/// A url source: the pods get the `fetch-model` init container. When a pod shows it running,
/// ModelLoaded and Ready say `Downloading`; kwok's nodes serve no container logs, so the
/// progress cannot be read, and the operator keeps the plain message instead of failing.
#[tokio::test]
async fn a_download_whose_log_cannot_be_read_is_still_reported_as_downloading() -> anyhow::Result<()>
{
    let (env, op) = setup("downloading").await?;
    apply(
        &env,
        "fetcher",
        "  model: Meta-Llama-3.2-1B\n  source: {type: url, url: 'https://models.example/llama-1b-Q8_0.gguf', format: gguf}\n  nodePool: {provider: kwok}\n",
    )
    .await?;
    // kwok runs the pod (its init container counts as done): the deployment becomes Ready.
    wait_ready(&env, &op, "fetcher", 90).await?;
    // The GPU memory estimate counts the Q8_0 weights the file name names: 1.24 B × 8.6 bits.
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let engine = api.get("fetcher").await?.status.and_then(|s| s.engine);
    assert_eq!(
        engine
            .as_ref()
            .map(|e| (e.weights.as_deref(), e.weights_gib)),
        Some((Some("Q8_0 (the file name in spec.source.url)"), Some(1.24))),
        "{engine:?}"
    );
    let pods = pods_of(&env, "fetcher").await?;
    let [pod] = pods.as_slice() else {
        anyhow::bail!("expected one server pod, got {}", pods.len());
    };
    let init = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default();
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["fetch-model"]
    );

    // Now the pod shows the download running, as a kubelet would while it runs.
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    Api::<Pod>::namespaced(env.client.clone(), &env.namespace)
        .patch_status(
            &pod_name,
            &Default::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "False"},
                    {"type": "Ready", "status": "False"},
                ],
                "initContainerStatuses": [{
                    "name": "fetch-model", "image": "llama-server", "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }],
            }})),
        )
        .await?;
    let (status, reason, message) = wait_for(Duration::from_secs(60), || async {
        condition(&api.get("fetcher").await.ok()?, "ModelLoaded").filter(|c| c.1 == "Downloading")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no Downloading condition: {e}\n{}", op.log_text()))?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Downloading"));
    assert_eq!(
        message,
        "downloading the model weights",
        "{}",
        op.log_text()
    );
    let ld = api.get("fetcher").await?;
    assert_eq!(
        condition(&ld, "Ready").map(|c| (c.0, c.1)),
        Some(("False".into(), "Downloading".into()))
    );
    // The operator tried the log (the API server could not reach a kubelet on the kwok node),
    // and that did not fail the reconcile.
    let log = op.log_text();
    assert!(log.contains("cannot read the fetch-model log"), "{log}");
    assert!(!log.contains("reconcile failed"), "{log}");

    // Then the download is done, and the server stops while loading, as a kubelet reports it:
    // in back-off, its last run ended with the reason `serve` wrote to its termination log.
    let why = "cannot load the model: GGUF metadata `general.architecture` in /models/llama-1b-Q8_0.gguf: qwen2";
    Api::<Pod>::namespaced(env.client.clone(), &env.namespace)
        .patch_status(
            &pod_name,
            &Default::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "False"},
                ],
                "initContainerStatuses": [{
                    "name": "fetch-model", "image": "llama-server", "imageID": "",
                    "ready": true, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }],
                "containerStatuses": [{
                    "name": "llama-server", "image": "llama-server", "imageID": "",
                    "ready": false, "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": why}},
                }],
            }})),
        )
        .await?;
    let (status, _, message) = wait_for(Duration::from_secs(60), || async {
        condition(&api.get("fetcher").await.ok()?, "ModelLoaded").filter(|c| c.1 == "LoadFailed")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no LoadFailed condition: {e}\n{}", op.log_text()))?;
    assert_eq!(status, "False");
    assert!(
        message.ends_with(&format!("{why} (exit code 1)")),
        "{message}"
    );
    // Nothing but a change mends it: kstatus's Stalled says so, with Ready's reason.
    let ld = api.get("fetcher").await?;
    assert_eq!(
        condition(&ld, "Stalled").map(|c| (c.0, c.1)),
        Some(("True".into(), "LoadFailed".into()))
    );
    Ok(())
}
