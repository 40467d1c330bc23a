//! GitOps: the example manifests applied with server-side apply, as Argo CD or Flux apply them,
//! reconcile to Ready; applying the same manifests again changes nothing, because the operator
//! never writes a LlamaDeployment's spec (only status, and its finalizer in metadata). Scaling
//! goes through the scale subresource, and a GitOps diff shows it.

use kube::api::Api;
use llama_operator::api::LlamaDeployment;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use testenv::llama::wait_ready;
use testenv::{OperatorProcess, TestEnv};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");
const GITOPS: &str = "--field-manager=gitops";

/// examples/quickstart.yaml, moved into the test's namespace (the file names `default`).
fn quickstart_in(namespace: &str) -> anyhow::Result<String> {
    let path = testenv::control_plane::workspace_root().join("examples/quickstart.yaml");
    let mut manifest: Value = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    manifest["metadata"]["namespace"] = Value::from(namespace);
    Ok(serde_yaml::to_string(&manifest)?)
}

/// `kubectl diff --server-side`: Ok(None) when nothing would change, Ok(Some(diff)) otherwise.
fn server_side_diff(
    env: &TestEnv,
    manifest: &str,
    extra: &[&str],
) -> anyhow::Result<Option<String>> {
    let mut args = vec!["diff", "--server-side", GITOPS, "-f", "-"];
    args.extend_from_slice(extra);
    let out = env.run_kubectl(&args, Some(manifest))?;
    match (out.success, out.stdout.is_empty()) {
        (true, true) => Ok(None),
        // kubectl diff exits 1 when it found differences, >1 when it failed.
        (false, false) => Ok(Some(out.stdout)),
        _ => anyhow::bail!("kubectl diff failed: {}{}", out.stdout, out.stderr),
    }
}

/// Who owns which top-level part of the object (`spec`, `status`, `metadata`), per manager.
fn owners(ld: &LlamaDeployment) -> Vec<(String, Option<String>, Vec<String>)> {
    ld.metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            let parts = m
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.as_object().cloned())
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            (
                m.manager.clone().unwrap_or_default(),
                m.subresource.clone(),
                parts,
            )
        })
        .collect()
}

#[tokio::test]
async fn reapplying_the_example_manifests_after_ready_changes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("gitops").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    let manifest = quickstart_in(&env.namespace)?;

    let out = env.run_kubectl(
        &["apply", "--server-side", GITOPS, "-f", "-"],
        Some(&manifest),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let ready = wait_ready(&env, &op, "quickstart", 90).await?;
    let generation = ready.metadata.generation;
    assert_eq!(generation, Some(1), "the spec was changed after apply");

    // Only the GitOps manager owns spec fields; the operator owns status (through the status
    // subresource) and its finalizer.
    for (manager, subresource, parts) in owners(&ready) {
        if manager != "gitops" {
            assert!(
                !parts.iter().any(|p| p == "f:spec"),
                "{manager} ({subresource:?}) owns spec fields: {:?}",
                ready.metadata.managed_fields
            );
        }
    }

    // What a GitOps controller does on every sync: diff, then apply the same manifests.
    assert_eq!(server_side_diff(&env, &manifest, &[])?, None);
    let out = env.run_kubectl(
        &["apply", "--server-side", GITOPS, "-f", "-"],
        Some(&manifest),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let after = api.get("quickstart").await?;
    assert_eq!(after.metadata.generation, generation);
    assert_eq!(
        serde_json::to_value(&after.spec)?,
        serde_json::to_value(&ready.spec)?
    );
    let ld = wait_ready(&env, &op, "quickstart", 30).await?;
    assert_eq!(ld.metadata.generation, generation);

    // An autoscaler (or `kubectl scale`) writes spec.compute.instanceCount through the scale
    // subresource and so takes that field over: a plain server-side apply of the manifests now
    // conflicts on exactly that field, and a forced one (what GitOps tools do) would set it
    // back. So with autoscaling, GitOps leaves instanceCount out of Git or ignores it
    // (docs/install.md).
    let out = env.run_kubectl(
        &["scale", "llamadeployment/quickstart", "--replicas=2"],
        None,
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let out = env.run_kubectl(
        &["diff", "--server-side", GITOPS, "-f", "-"],
        Some(&manifest),
    )?;
    assert!(
        out.stderr
            .contains("conflict with \"kubectl\" with subresource \"scale\"")
            && out.stderr.contains(".spec.compute.instanceCount"),
        "{out:?}"
    );
    let diff = server_side_diff(&env, &manifest, &["--force-conflicts"])?
        .ok_or_else(|| anyhow::anyhow!("scaling did not show in kubectl diff"))?;
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| {
            (l.starts_with('-') || l.starts_with('+'))
                && !l.starts_with("---")
                && !l.starts_with("+++")
        })
        .filter(|l| !l.contains("generation:"))
        .collect();
    assert_eq!(
        changed
            .iter()
            .map(|l| l.trim_start_matches(['-', '+']).trim())
            .collect::<Vec<_>>(),
        ["instanceCount: 2", "instanceCount: 1"],
        "{diff}"
    );
    Ok(())
}

#[tokio::test]
async fn argocd_health_check_reads_real_deployments() -> anyhow::Result<()> {
    // The documented health check is this very file.
    let script = std::fs::read_to_string(testenv::argocd::llamadeployment_health_script())?;
    let guide =
        std::fs::read_to_string(testenv::control_plane::workspace_root().join("docs/install.md"))?;
    assert!(
        guide.contains(script.trim()),
        "docs/install.md does not show docs/argocd/llamadeployment-health.lua as it is"
    );

    let env = TestEnv::new("argocd-health").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let spec = |instance_type: &str, count: i32| {
        format!(
            "  model: Meta-Llama-3.2-1B-Instruct\n  source: {{type: demo}}\n  compute: {{instanceType: {instance_type}, instanceCount: {count}}}\n  nodePool: {{provider: kwok}}\n"
        )
    };
    testenv::llama::apply(&env, "ready", &spec("Standard_NC24ads_A100_v4", 1)).await?;
    testenv::llama::apply(&env, "unknown-type", &spec("Standard_Nope_v9", 1)).await?;
    testenv::llama::apply(&env, "zero", &spec("Standard_NC24ads_A100_v4", 0)).await?;

    let ready = wait_ready(&env, &op, "ready", 90).await?;
    let (status, message) = testenv::argocd::health(&serde_json::to_value(&ready)?)?;
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.contains("1/1 instances ready"), "{message}");

    // A newer spec than the operator has seen is progressing, whatever the old status says.
    let mut ahead = serde_json::to_value(&ready)?;
    ahead["metadata"]["generation"] = Value::from(ready.metadata.generation.unwrap_or(1) + 1);
    assert_eq!(testenv::argocd::health(&ahead)?.0, "Progressing");
    // So is a deployment the operator has not reconciled yet.
    let mut fresh = serde_json::to_value(&ready)?;
    fresh["status"] = Value::Null;
    assert_eq!(testenv::argocd::health(&fresh)?.0, "Progressing");

    for (name, reason, want) in [
        ("unknown-type", "InstanceTypeUnknown", "Degraded"),
        ("zero", "ScaledToZero", "Suspended"),
    ] {
        let ld = testenv::wait_for(Duration::from_secs(60), || async {
            let ld = api.get(name).await.ok()?;
            (testenv::llama::condition(&ld, "Ready")?.1 == reason).then_some(ld)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{name}: no {reason}: {e}\n{}", op.log_text()))?;
        let (status, message) = testenv::argocd::health(&serde_json::to_value(&ld)?)?;
        assert_eq!(status, want, "{name}: {message}");
        assert!(!message.is_empty(), "{name}: no message");
    }
    Ok(())
}
