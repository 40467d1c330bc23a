//! With the operator's autoscaler off, the instance count belongs to whoever uses the scale
//! subresource: `kubectl scale` here, an HPA or KEDA in production.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use llama_operator::api::LlamaDeployment;
use std::path::Path;
use std::time::Duration;
use testenv::llama::{apply, wait_ready};
use testenv::{OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

async fn nodes_of(env: &TestEnv, name: &str) -> anyhow::Result<usize> {
    let sel = format!(
        "llama-operator.io/deployment-namespace={},llama-operator.io/deployment={name}",
        env.namespace
    );
    Ok(Api::<Node>::all(env.client.clone())
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .len())
}

/// Waits until `name` runs `want` ready instances on `want` nodes.
async fn wait_instances(
    env: &TestEnv,
    op: &OperatorProcess,
    name: &str,
    want: i32,
) -> anyhow::Result<LlamaDeployment> {
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for(Duration::from_secs(90), || async {
        let ld = api.get(name).await.ok()?;
        let counts = ld.status.as_ref()?.instances.clone()?;
        let nodes = nodes_of(env, name).await.ok()?;
        ((counts.desired, counts.ready, nodes as i32) == (want, want, want)).then_some(ld)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{name}: expected {want} ready instances on {want} nodes: {e}\n{}",
            op.log_text()
        )
    })
}

#[tokio::test]
async fn kubectl_scale_sets_the_count_when_autoscaling_is_off() -> anyhow::Result<()> {
    let env = TestEnv::new("scale-interop").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    let spec = "  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1}\n  nodePool: {provider: kwok}\n";
    apply(&env, "manual", spec).await?;
    wait_ready(&env, &op, "manual", 90).await?;

    // Up through the scale subresource: instances and nodes follow.
    let out = env.run_kubectl(&["scale", "llamadeployment/manual", "--replicas=3"], None)?;
    anyhow::ensure!(out.success, "kubectl scale: {out:?}");
    let ld = wait_instances(&env, &op, "manual", 3).await?;
    assert_eq!(ld.spec.compute.instance_count, 3);
    let status = ld.status.expect("status");
    assert!(status.autoscaling.is_none(), "{:?}", status.autoscaling);
    // The scale subresource reads back what it set, with the pods' selector for HPA and KEDA.
    let out = env.run_kubectl(
        &[
            "get",
            "--raw",
            &format!(
                "/apis/llama-operator.io/v1alpha1/namespaces/{}/llamadeployments/manual/scale",
                env.namespace
            ),
        ],
        None,
    )?;
    anyhow::ensure!(out.success, "GET scale: {out:?}");
    let scale: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(scale["spec"]["replicas"], 3, "{scale}");
    assert_eq!(scale["status"]["replicas"], 3, "{scale}");
    assert_eq!(
        scale["status"]["selector"],
        "app.kubernetes.io/name=llama-server,llama-operator.io/deployment=manual",
        "{scale}"
    );

    // Down: the emptied nodes are released.
    let out = env.run_kubectl(&["scale", "llamadeployment/manual", "--replicas=1"], None)?;
    anyhow::ensure!(out.success, "kubectl scale: {out:?}");
    wait_instances(&env, &op, "manual", 1).await?;

    // Bounds set, but the annotation leaves the count to kubectl (or an HPA/KEDA) all the same.
    let yaml = "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata:\n  name: external\n  annotations: {llama-operator.io/autoscaling: disabled}\nspec:\n  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1, minInstances: 1, maxInstances: 4}\n  nodePool: {provider: kwok}\n";
    let out = env.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(yaml))?;
    anyhow::ensure!(out.success, "kubectl apply: {out:?}");
    wait_ready(&env, &op, "external", 90).await?;
    let out = env.run_kubectl(&["scale", "llamadeployment/external", "--replicas=2"], None)?;
    anyhow::ensure!(out.success, "kubectl scale: {out:?}");
    let ld = wait_instances(&env, &op, "external", 2).await?;
    assert!(ld.status.expect("status").autoscaling.is_none());
    // Outside the bounds is refused at admission, naming the field.
    let out = env.run_kubectl(&["scale", "llamadeployment/external", "--replicas=7"], None)?;
    assert!(!out.success);
    assert!(
        out.stderr.contains(
            "spec.compute.instanceCount must be less than or equal to spec.compute.maxInstances"
        ),
        "{}",
        out.stderr
    );
    Ok(())
}
