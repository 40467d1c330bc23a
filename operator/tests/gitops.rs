//! GitOps: the example manifests applied with server-side apply, as Argo CD or Flux apply them,
//! reconcile to Ready; applying the same manifests again changes nothing, because the operator
//! never writes a LlamaDeployment's spec (only status, and its finalizer in metadata) — its
//! autoscaler included, which keeps its count in status. `kubectl scale` (or an HPA, KEDA) goes
//! through the scale subresource, and a GitOps diff shows it.

use kube::api::Api;
use llama_operator::api::LlamaDeployment;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use testenv::llama::{condition, wait_ready};
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

/// The changed lines of a unified diff, without their `-`/`+` and indentation, leaving out
/// `generation:` (a dry run of a changed spec bumps it).
fn changed_lines(diff: &str) -> Vec<String> {
    diff.lines()
        .filter(|l| {
            (l.starts_with('-') || l.starts_with('+'))
                && !l.starts_with("---")
                && !l.starts_with("+++")
        })
        .map(|l| l.trim_start_matches(['-', '+']).trim().to_string())
        .filter(|l| !l.starts_with("generation:"))
        .collect()
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

    // `kubectl scale` (or an HPA, KEDA) writes spec.compute.instanceCount through the scale
    // subresource and so takes that field over: a plain server-side apply of the manifests now
    // conflicts on exactly that field, and a forced one (what GitOps tools do) would set it
    // back. So with those, GitOps leaves instanceCount out of Git or ignores it
    // (docs/install.md). The operator's own autoscaler writes status only (next test).
    let out = env.run_kubectl(
        &["scale", "llamadeployment/quickstart", "--replicas=2"],
        None,
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    // Let the operator finish reconciling the new count first: its status writes while
    // `kubectl diff` runs would show up in the diff (the live object is read before the
    // dry-run apply returns the merged one).
    let scaled = generation.map(|g| g + 1);
    testenv::wait_for(Duration::from_secs(90), || async {
        let ld = api.get("quickstart").await.ok()?;
        let status = ld.status.as_ref()?;
        let instances = status.instances.as_ref()?;
        let settled = status.observed_generation == scaled
            && instances.ready == 2
            && condition(&ld, "Ready")?.0 == "True";
        settled.then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("scaling to 2 never settled: {e}\n{}", op.log_text()))?;
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
    // A status write landing between kubectl's read and its dry run (the resourceVersion then
    // differs in the diff) is retried; any other extra line fails the test.
    let mut attempts = 0;
    let (diff, changed) = loop {
        let diff = server_side_diff(&env, &manifest, &["--force-conflicts"])?
            .ok_or_else(|| anyhow::anyhow!("scaling did not show in kubectl diff"))?;
        let changed = changed_lines(&diff);
        attempts += 1;
        if attempts == 3 || !changed.iter().any(|l| l.starts_with("resourceVersion:")) {
            break (diff, changed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(changed, ["instanceCount: 2", "instanceCount: 1"], "{diff}");
    Ok(())
}

#[tokio::test]
async fn an_autoscaled_deployment_reapplies_without_a_diff() -> anyhow::Result<()> {
    let env = TestEnv::new("gitops-autoscaled").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    let mut manifest: Value = serde_yaml::from_str(&quickstart_in(&env.namespace)?)?;
    let compute = &mut manifest["spec"]["compute"];
    compute["minInstances"] = Value::from(1);
    compute["maxInstances"] = Value::from(3);
    compute["autoscaling"] = serde_json::json!({ "scrapeIntervalSeconds": 1 });
    let manifest = serde_yaml::to_string(&manifest)?;

    let out = env.run_kubectl(
        &["apply", "--server-side", GITOPS, "-f", "-"],
        Some(&manifest),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    wait_ready(&env, &op, "quickstart", 90).await?;
    // Let the autoscaler evaluate a few times (the kwok pods serve no metrics, so it reports
    // them missing and holds the count): it writes its state to status, never to spec.
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let evaluated = loop {
        let ld = api.get("quickstart").await?;
        let status = serde_json::to_value(&ld.status)?;
        if status["autoscaling"]["lastEvaluationTime"].is_string() {
            break ld;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the autoscaler never evaluated: {status}\n{}",
            op.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ld = api.get("quickstart").await?;
    assert_eq!(ld.metadata.generation, Some(1), "the spec was changed");
    assert_ne!(
        serde_json::to_value(&ld.status)?["autoscaling"]["lastEvaluationTime"],
        Value::Null
    );
    for (manager, subresource, parts) in owners(&ld) {
        if manager != "gitops" {
            assert!(
                !parts.iter().any(|p| p == "f:spec"),
                "{manager} ({subresource:?}) owns spec fields"
            );
        }
    }
    assert_eq!(server_side_diff(&env, &manifest, &[])?, None);
    let out = env.run_kubectl(
        &["apply", "--server-side", GITOPS, "-f", "-"],
        Some(&manifest),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    assert_eq!(
        api.get("quickstart").await?.metadata.generation,
        evaluated.metadata.generation
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
    // Flux (kstatus) agrees: Current once Ready, with Reconciling and Stalled False.
    assert_eq!(
        testenv::kstatus::status(&serde_json::to_value(&ready)?)?.0,
        "Current"
    );

    // A newer spec than the operator has seen is progressing, whatever the old status says.
    let mut ahead = serde_json::to_value(&ready)?;
    ahead["metadata"]["generation"] = Value::from(ready.metadata.generation.unwrap_or(1) + 1);
    assert_eq!(testenv::argocd::health(&ahead)?.0, "Progressing");
    // So is a deployment the operator has not reconciled yet.
    let mut fresh = serde_json::to_value(&ready)?;
    fresh["status"] = Value::Null;
    assert_eq!(testenv::argocd::health(&fresh)?.0, "Progressing");

    assert_eq!(testenv::kstatus::status(&ahead)?.0, "InProgress");
    // While it provisions and loads, Reconciling is True: Flux waits (InProgress).
    let mut loading = serde_json::to_value(&ready)?;
    for condition in loading["status"]["conditions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        match condition["type"].as_str() {
            Some("Ready") => {
                condition["status"] = Value::from("False");
                condition["reason"] = Value::from("Loading");
            }
            Some("Reconciling") => condition["status"] = Value::from("True"),
            _ => {}
        }
    }
    assert_eq!(testenv::kstatus::status(&loading)?.0, "InProgress");

    // Argo CD's and Flux's verdicts on real deployments the operator could not make Ready.
    for (name, reason, want, flux) in [
        ("unknown-type", "InstanceTypeUnknown", "Degraded", "Failed"),
        ("zero", "ScaledToZero", "Suspended", "InProgress"),
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
        let (status, message) = testenv::kstatus::status(&serde_json::to_value(&ld)?)?;
        assert_eq!(status, flux, "{name} (Flux): {message}");
    }
    Ok(())
}
