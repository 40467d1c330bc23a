//! A real `helm install` of `charts/llama-operator` on the test control plane, then the real
//! operator run the way the chart's pods would run it — the chart's arguments and configuration,
//! and the chart's ServiceAccount (a bound token, no admin rights) — through a deployment's
//! life; then `helm upgrade` with changed configuration and `helm uninstall`.
//!
//! The chart's own pods land on a kwok node and do not run the binary; the test runs it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use llama_operator::api::{ComputeQuota, LlamaDeployment};
use llama_operator::build::karpenter_node_pool_resource;
use llama_operator::config::OperatorConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testenv::helm::{Helm, chart_dir, service_account_kubeconfig};
use testenv::llama::wait_ready;
use testenv::{OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");
/// The release name; with it every object is named `llama-operator`.
const RELEASE: &str = "llama-operator";

/// A simulated node (kwok) for the chart's own pods, so that `helm install --wait` sees them
/// scheduled and Ready.
const SYSTEM_NODE: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: helm-test-system-node
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {kubernetes.io/hostname: helm-test-system-node, kubernetes.io/os: linux, type: kwok}
status:
  capacity: {cpu: "8", memory: 32Gi, pods: "110"}
  allocatable: {cpu: "8", memory: 32Gi, pods: "110"}
"#;

const QUICKSTART: &str = "apiVersion: llama-operator.io/v1alpha1
kind: LlamaDeployment
metadata: {name: quickstart}
spec:
  model: Meta-Llama-3.2-1B-Instruct
  source: {type: demo}
  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1}
  nodePool: {provider: kwok}
";

fn ensure_ok(out: testenv::KubectlOutput) -> anyhow::Result<String> {
    anyhow::ensure!(out.success, "{}{}", out.stdout, out.stderr);
    Ok(out.stdout)
}

/// The release: its namespace (restricted Pod Security), helm, and the chart's path.
struct Release {
    env: TestEnv,
    helm: Helm,
    chart: String,
}

impl Release {
    fn ns(&self) -> &str {
        &self.env.namespace
    }

    fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--namespace", self.ns()]);
        self.helm.ok(&all)
    }

    /// Objects of the release of one kind, by name.
    fn objects(&self, kind: &str) -> anyhow::Result<String> {
        let selector = format!("app.kubernetes.io/instance={RELEASE}");
        ensure_ok(
            self.env
                .run_kubectl(&["get", kind, "-l", &selector, "-o", "name"], None)?,
        )
    }
}

/// The operator configuration file as the kubelet would keep it: the ConfigMap's `config.yaml`,
/// replaced atomically.
struct MountedConfig {
    config_maps: Api<ConfigMap>,
    path: PathBuf,
}

impl MountedConfig {
    async fn sync(&self) -> anyhow::Result<String> {
        let cm = self.config_maps.get(&format!("{RELEASE}-config")).await?;
        let text = cm
            .data
            .and_then(|d| d.get("config.yaml").cloned())
            .ok_or_else(|| anyhow::anyhow!("ConfigMap without config.yaml"))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(text)
    }
}

/// `helm install`: bad values are refused; good ones install the CRDs and a Deployment whose
/// replicas pass the restricted Pod Security Standard and become Ready; NOTES say what next.
async fn install() -> anyhow::Result<Release> {
    let env = TestEnv::new("helm-system").await?;
    let release = Release {
        helm: Helm::for_env(&env)?,
        chart: chart_dir().display().to_string(),
        env,
    };
    let ns = release.ns().to_owned();
    let label = "pod-security.kubernetes.io/enforce=restricted";
    ensure_ok(
        release
            .env
            .run_kubectl(&["label", "namespace", &ns, label], None)?,
    )?;
    ensure_ok(
        release
            .env
            .run_kubectl(&["apply", "-f", "-"], Some(SYSTEM_NODE))?,
    )?;

    // Bad values fail the install itself and leave nothing behind.
    let out = release.helm.run(&[
        "install",
        RELEASE,
        &release.chart,
        "--namespace",
        &ns,
        "--set",
        "config.drainSecs=1",
    ])?;
    assert!(
        !out.success && out.stderr.contains("drainSecs"),
        "{}",
        out.stderr
    );
    assert!(!release.helm(&["list", "-q"])?.contains(RELEASE));

    let notes = release.helm(&[
        "install",
        RELEASE,
        &release.chart,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    for words in [
        "kubectl apply -f",
        "kubectl get llamadeployments",
        &format!("kubectl -n {ns} rollout status deployment/{RELEASE}"),
    ] {
        assert!(notes.contains(words), "{words:?} not in NOTES:\n{notes}");
    }
    let deployment = Api::<Deployment>::namespaced(release.env.client.clone(), &ns)
        .get(RELEASE)
        .await?;
    let ready = deployment.status.and_then(|s| s.ready_replicas);
    assert_eq!(
        ready,
        Some(2),
        "helm --wait returned before both replicas were ready"
    );
    // From the chart's crds/.
    ensure_ok(release.env.run_kubectl(
        &[
            "get",
            "crd",
            "llamadeployments.llama-operator.io",
            "computequotas.llama-operator.io",
        ],
        None,
    )?)?;
    Ok(release)
}

/// Starts the real operator as the chart's pod would: the Deployment's arguments (only the
/// config path and metrics port differ on this machine), the ConfigMap's file, the
/// ServiceAccount's identity and the downward-API variables. Waits until it leads.
async fn run_operator_as_the_chart(
    release: &Release,
) -> anyhow::Result<(OperatorProcess, MountedConfig)> {
    let ns = release.ns();
    let work = release.env.plane.dir.join(format!("helm-{ns}"));
    std::fs::create_dir_all(&work)?;
    let kubeconfig = work.join("operator.kubeconfig");
    service_account_kubeconfig(&release.env, ns, RELEASE, &kubeconfig)?;
    let config = MountedConfig {
        config_maps: Api::namespaced(release.env.client.clone(), ns),
        path: work.join("config.yaml"),
    };
    config.sync().await?;

    let deployment = Api::<Deployment>::namespaced(release.env.client.clone(), ns)
        .get(RELEASE)
        .await?;
    let container = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .ok_or_else(|| anyhow::anyhow!("chart Deployment without a container"))?;
    let mut args: Vec<String> = container.args.unwrap_or_default();
    for (flag, value) in [
        ("--config", config.path.display().to_string()),
        ("--metrics-addr", "127.0.0.1:0".to_owned()),
    ] {
        let at = args
            .iter()
            .position(|a| a == flag)
            .ok_or_else(|| anyhow::anyhow!("chart passes no {flag}: {args:?}"))?;
        args[at + 1] = value;
    }
    assert!(args.iter().any(|a| a == "--leader-elect"), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pod_name = format!("{RELEASE}-test-replica");
    let op = OperatorProcess::start_as(
        &release.env,
        Path::new(OPERATOR),
        &args,
        &kubeconfig,
        &[("POD_NAME", &pod_name), ("POD_NAMESPACE", ns)],
    )?;

    // It leads through the Lease the chart's Role allows.
    let leases: Api<Lease> = Api::namespaced(release.env.client.clone(), ns);
    wait_for(Duration::from_secs(30), || async {
        let lease = leases.get("llama-operator-leader").await.ok()?;
        (lease.spec?.holder_identity? == pod_name).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: no leadership\n{}", op.log_text()))?;
    Ok((op, config))
}

/// A deployment in another namespace, under a ComputeQuota: every call the operator makes for it
/// (quota, keys, nodes, server, endpoint, events, finalizer) is made as the ServiceAccount.
async fn deploy_and_switch_to_user_keys(
    work: &TestEnv,
    op: &OperatorProcess,
) -> anyhow::Result<()> {
    let wns = &work.namespace;
    let quota = "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: default}\nspec:\n  limits: [{family: StandardNCADSA100v4Family, cores: 96}]\n";
    ensure_ok(work.run_kubectl(&["apply", "-f", "-"], Some(quota))?)?;
    ensure_ok(work.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(QUICKSTART))?)?;
    let ld = wait_ready(work, op, "quickstart", 120).await?;
    assert_eq!(
        ld.status.and_then(|s| s.endpoint),
        Some(format!("http://quickstart.{wns}.svc"))
    );
    let quotas: Api<ComputeQuota> = Api::namespaced(work.client.clone(), wns);
    wait_for(Duration::from_secs(30), || async {
        let q = quotas.get("default").await.ok()?;
        // ceil(1.2 × 1) × 24 cores.
        (q.status?.families.first()?.used == 48).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("ComputeQuota status not written: {e}\n{}", op.log_text()))?;
    let events = ensure_ok(work.run_kubectl(
        &[
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].reportingController}",
        ],
        None,
    )?)?;
    assert!(
        events.contains("llama-operator"),
        "no operator Events: {events}"
    );

    // User-supplied keys replace the generated Secret, which the operator then deletes.
    let secrets: Api<Secret> = Api::namespaced(work.client.clone(), wns);
    assert!(secrets.get_opt("quickstart-keys").await?.is_some());
    ensure_ok(work.run_kubectl(
        &[
            "create",
            "secret",
            "generic",
            "my-keys",
            "--from-literal=primaryKey=abcdefghijklmnopqrstuvwxyz012345",
            "--from-literal=secondaryKey=ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
        ],
        None,
    )?)?;
    Api::<LlamaDeployment>::namespaced(work.client.clone(), wns)
        .patch(
            "quickstart",
            &PatchParams::apply(testenv::FIELD_MANAGER),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "llama-operator.io/v1alpha1", "kind": "LlamaDeployment",
                "spec": {"auth": {"secretRef": {"name": "my-keys"}}},
            })),
        )
        .await?;
    wait_for(Duration::from_secs(30), || async {
        (secrets.get_opt("quickstart-keys").await.ok()?.is_none()).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("generated Secret kept: {e}\n{}", op.log_text()))?;
    Ok(())
}

/// `helm upgrade` with changed configuration: the ConfigMap changes, the operator's pods do not
/// restart (the file is re-read), and the change reaches the workload.
async fn upgrade_configuration(
    release: &Release,
    config: &MountedConfig,
    work: &TestEnv,
    op: &OperatorProcess,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(release.env.client.clone(), release.ns());
    let generation = deployments.get(RELEASE).await?.metadata.generation;
    release.helm(&[
        "upgrade",
        RELEASE,
        &release.chart,
        "--reuse-values",
        "--set",
        "config.drainSeconds=90",
        // A shared pool whose deployments live 18 seconds, for shared_quota_expiry.
        "--set-json",
        r#"config.sharedQuota={"StandardNCADSA100v4Family":96}"#,
        // (`--set` passes fractions as strings, which the schema refuses.)
        "--set-json",
        "config.sharedQuotaHours=0.005",
        "--wait",
        "--timeout",
        "120s",
    ])?;
    let text = config.sync().await?;
    let parsed = OperatorConfig::parse(&text)?;
    assert_eq!(parsed.drain_seconds, 90, "{text}");
    assert_eq!(
        parsed.shared_quota["StandardNCADSA100v4Family"], 96,
        "{text}"
    );
    assert_eq!(
        deployments.get(RELEASE).await?.metadata.generation,
        generation,
        "a configuration change rolled the operator's pods"
    );
    let servers: Api<Deployment> = Api::namespaced(work.client.clone(), &work.namespace);
    wait_for(Duration::from_secs(60), || async {
        let d = servers.get("quickstart").await.ok()?;
        // drainSeconds + 30.
        (d.spec?.template.spec?.termination_grace_period_seconds? == 120).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("drainSeconds not applied: {e}\n{}", op.log_text()))?;
    let history = release.helm(&["history", RELEASE])?;
    assert!(history.contains("Upgrade complete"), "{history}");
    Ok(())
}

/// The shared pool the upgrade configured: a deployment without dedicated quota borrows it and
/// is deleted when its time is up.
async fn shared_quota_expiry(op: &OperatorProcess) -> anyhow::Result<()> {
    let env = TestEnv::new("helm-shared").await?;
    let quota = "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: default}\nspec:\n  limits: [{family: StandardNCADSA100v4Family, cores: 0}]\n";
    ensure_ok(env.run_kubectl(&["apply", "-f", "-"], Some(quota))?)?;
    let borrowed = QUICKSTART
        .replace("name: quickstart", "name: borrowed")
        .replace(
            "  nodePool:",
            "  quota: {useSharedQuota: true}\n  nodePool:",
        );
    ensure_ok(env.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(&borrowed))?)?;
    let lds: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for(Duration::from_secs(30), || async {
        let status = lds.get("borrowed").await.ok()?.status?;
        (status.quota_source? == llama_operator::api::QuotaSource::Shared).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("not admitted on shared quota: {e}\n{}", op.log_text()))?;
    wait_for(Duration::from_secs(60), || async {
        lds.get_opt("borrowed").await.ok()?.is_none().then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("not deleted at expiry: {e}\n{}", op.log_text()))?;
    Ok(())
}

/// Delete: the finalizer releases the simulated GPU node, then the object goes.
async fn delete(work: &TestEnv, op: &OperatorProcess) -> anyhow::Result<()> {
    let lds: Api<LlamaDeployment> = Api::namespaced(work.client.clone(), &work.namespace);
    lds.delete("quickstart", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), || async {
        lds.get_opt("quickstart")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("not deleted: {e}\n{}", op.log_text()))?;
    let selector = format!("llama-operator.io/deployment-namespace={}", work.namespace);
    let nodes = Api::<Node>::all(work.client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?;
    assert!(nodes.items.is_empty(), "nodes left: {:?}", nodes.items);
    Ok(())
}

/// The other paths to the API: a Karpenter NodePool (with Karpenter's published CRDs) created,
/// listed and released, and a referenced PersistentVolumeClaim looked up.
async fn karpenter_pool_and_claim_reference(
    work: &TestEnv,
    op: &OperatorProcess,
) -> anyhow::Result<()> {
    testenv::install_crds_from(&work.client, &testenv::karpenter::crds_dir()?).await?;
    let lds: Api<LlamaDeployment> = Api::namespaced(work.client.clone(), &work.namespace);
    let pool = QUICKSTART
        .replace("name: quickstart", "name: pool")
        .replace("provider: kwok", "provider: karpenter");
    ensure_ok(work.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(&pool))?)?;
    let pools: Api<DynamicObject> =
        Api::all_with(work.client.clone(), &karpenter_node_pool_resource());
    let selector = format!(
        "llama-operator.io/deployment-namespace={},llama-operator.io/deployment=pool",
        work.namespace
    );
    let listed = || async {
        pools
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()
            .map(|l| l.items.len())
    };
    wait_for(Duration::from_secs(30), || async {
        (listed().await? == 1).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePool: {e}\n{}", op.log_text()))?;
    lds.delete("pool", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(30), || async {
        let gone = lds.get_opt("pool").await.ok()?.is_none();
        (gone && listed().await? == 0).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("NodePool not released: {e}\n{}", op.log_text()))?;

    let claim = QUICKSTART
        .replace("name: quickstart", "name: weights")
        .replace(
            "{type: demo}",
            "{type: pvc, pvc: {claimName: no-such-claim}}",
        );
    ensure_ok(work.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(&claim))?)?;
    wait_for(Duration::from_secs(30), || async {
        let ld = lds.get("weights").await.ok()?;
        let reason = testenv::llama::condition(&ld, "Ready")?.1;
        (reason == "PersistentVolumeClaimNotFound").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("claim not looked up: {e}\n{}", op.log_text()))?;
    Ok(())
}

/// The check on the log catches a missing rule: without `list pods` the next deployment's
/// reconcile is refused, and the log says so.
async fn a_missing_rule_shows_in_the_log(
    release: &Release,
    work: &TestEnv,
    op: &OperatorProcess,
) -> anyhow::Result<()> {
    let role = ensure_ok(
        release
            .env
            .run_kubectl(&["get", "clusterrole", RELEASE, "-o", "json"], None)?,
    )?;
    let mut role: Value = serde_json::from_str(&role)?;
    let rules = role["rules"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("ClusterRole without rules"))?;
    let before = rules.len();
    rules.retain(|r| r["resources"] != serde_json::json!(["pods"]));
    assert_eq!(rules.len(), before - 1, "no pods rule to remove");
    ensure_ok(
        release
            .env
            .run_kubectl(&["replace", "-f", "-"], Some(&role.to_string()))?,
    )?;
    let second = QUICKSTART.replace("name: quickstart", "name: second");
    ensure_ok(work.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(&second))?)?;
    wait_for(Duration::from_secs(60), || async {
        op.log_text().contains("pods is forbidden").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("no 403 logged: {e}\n{}", op.log_text()))?;
    Ok(())
}

/// `helm uninstall` removes what it installed and keeps the CRDs (and so every deployment).
fn uninstall(release: &Release, work: &TestEnv) -> anyhow::Result<()> {
    release.helm(&["uninstall", RELEASE, "--wait", "--timeout", "120s"])?;
    for kind in [
        "deployment",
        "serviceaccount",
        "configmap",
        "service",
        "poddisruptionbudget",
        "role",
        "rolebinding",
        "clusterrole",
        "clusterrolebinding",
    ] {
        let left = release.objects(kind)?;
        assert!(left.trim().is_empty(), "{kind} left: {left}");
    }
    ensure_ok(release.env.run_kubectl(
        &[
            "get",
            "crd",
            "llamadeployments.llama-operator.io",
            "computequotas.llama-operator.io",
        ],
        None,
    )?)?;
    let quota =
        ensure_ok(work.run_kubectl(&["get", "computequota", "default", "-o", "name"], None)?)?;
    assert_eq!(quota.trim(), "computequota.llama-operator.io/default");
    Ok(())
}

#[tokio::test]
async fn helm_install_runs_the_operator_as_its_service_account_then_upgrade_and_uninstall()
-> anyhow::Result<()> {
    let release = install().await?;
    let (op, config) = run_operator_as_the_chart(&release).await?;
    let work = TestEnv::new("helm-workload").await?;
    deploy_and_switch_to_user_keys(&work, &op).await?;
    upgrade_configuration(&release, &config, &work, &op).await?;
    shared_quota_expiry(&op).await?;
    delete(&work, &op).await?;
    karpenter_pool_and_claim_reference(&work, &op).await?;

    // Not one call was refused: the chart's RBAC covers everything the operator did.
    let log = op.log_text();
    assert!(
        !log.to_ascii_lowercase().contains("forbidden"),
        "the operator was refused a call:\n{log}"
    );
    a_missing_rule_shows_in_the_log(&release, &work, &op).await?;
    drop(op);
    uninstall(&release, &work)
}
