//! The Helm chart `charts/llama-operator` with the real `helm` (built by scripts/build-helm.sh):
//! lint, values schema, rendering checked by the API server, and a real install whose
//! ServiceAccount — not an admin — runs the real operator through a deployment's life, then an
//! upgrade and an uninstall.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use llama_operator::api::{ComputeQuota, LlamaDeployment};
use llama_operator::config::OperatorConfig;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use testenv::helm::{Helm, chart_dir, service_account_kubeconfig};
use testenv::llama::wait_ready;
use testenv::{OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");
/// The release name; with it every object is named `llama-operator`.
const RELEASE: &str = "llama-operator";

/// The documents of a multi-document YAML stream, empty ones dropped.
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    kinds.sort();
    kinds
}

fn chart() -> String {
    chart_dir().display().to_string()
}

/// `helm template` of the chart with extra arguments.
fn template(helm: &Helm, namespace: &str, extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.as_str(),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    documents(&helm.ok(&args)?)
}

/// The operator configuration file a rendering puts in the ConfigMap.
fn rendered_config(docs: &[Value]) -> anyhow::Result<String> {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .ok_or_else(|| anyhow::anyhow!("no ConfigMap rendered"))?;
    cm["data"]["config.yaml"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("ConfigMap without config.yaml: {cm}"))
}

#[test]
fn chart_crds_are_the_generated_crds() -> anyhow::Result<()> {
    // The chart's crds/ must never be edited by hand: byte for byte what crdgen wrote to crds/
    // (itself checked against the Rust types by crds_are_fresh.rs).
    let root = testenv::control_plane::workspace_root();
    let list = |dir: &Path| -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    };
    let generated = root.join("crds");
    let copied = chart_dir().join("crds");
    let fix = "run `cp crds/*.yaml charts/llama-operator/crds/`";
    assert_eq!(
        list(&copied)?,
        list(&generated)?,
        "charts/llama-operator/crds/ and crds/ hold different files: {fix}"
    );
    for name in list(&generated)? {
        assert!(
            std::fs::read(copied.join(&name))? == std::fs::read(generated.join(&name))?,
            "charts/llama-operator/crds/{name} differs from crds/{name}: {fix}"
        );
    }
    Ok(())
}

#[test]
fn chart_lints_clean_and_its_version_is_the_operators() -> anyhow::Result<()> {
    let helm = Helm::offline()?;
    let chart = chart();
    for extra in [
        &[][..],
        &["--set", "serviceMonitor.enabled=true"][..],
        &[
            "--set",
            "replicas=1",
            "--set",
            "leaderElection.enabled=false",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend_from_slice(extra);
        let out = helm.ok(&args)?;
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
    // The chart's appVersion is the release of the images it deploys: the crates' version.
    let meta: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml"))?)?;
    assert_eq!(meta["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"));
    Ok(())
}

#[test]
fn bad_values_fail_with_a_message_naming_the_value() -> anyhow::Result<()> {
    let helm = Helm::offline()?;
    let chart = chart();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "config.surgeFactr=1.5"],
            "additional properties 'surgeFactr' not allowed",
        ),
        (&["--set", "config.surgeFactor=5"], "/config/surgeFactor"),
        (&["--set", "replicas=two"], "/replicas"),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            "/image/pullPolicy",
        ),
        (
            &["--set-json", r#"config.models=[{"name":"Llama-4"}]"#],
            "/config/models/0",
        ),
        (
            &[
                "--set-json",
                r#"config.sharedQuota={"StandardNCADSA100v4Family":"many"}"#,
            ],
            "/config/sharedQuota/StandardNCADSA100v4Family",
        ),
        (
            &[
                "--set",
                "replicas=3",
                "--set",
                "leaderElection.enabled=false",
            ],
            "replicas > 1 needs leaderElection.enabled=true",
        ),
        (
            &[
                "--set",
                "serviceMonitor.enabled=true",
                "--set",
                "metrics.service.enabled=false",
            ],
            "serviceMonitor.enabled needs metrics.service.enabled",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec!["template", RELEASE, chart.as_str()];
        args.extend_from_slice(extra);
        let out = helm.run(&args)?;
        assert!(!out.success, "{extra:?} was accepted");
        assert!(
            out.stderr.contains(message),
            "{extra:?}: expected {message:?} in:\n{}",
            out.stderr
        );
    }
    Ok(())
}

#[test]
fn default_values_render_the_operators_defaults_and_pin_the_server_image() -> anyhow::Result<()> {
    let helm = Helm::offline()?;
    let docs = template(&helm, "llama-system", &[])?;
    let config = OperatorConfig::parse(&rendered_config(&docs)?)?;
    // The chart's defaults are the operator's: no silent policy difference between a plain
    // binary and a chart install.
    assert_eq!(config, OperatorConfig::default());
    assert_eq!(
        config.server_image,
        format!(
            "ghcr.io/llama-operator/llama-server:{}",
            env!("CARGO_PKG_VERSION")
        )
    );

    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .ok_or_else(|| anyhow::anyhow!("no Deployment"))?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!(
            "ghcr.io/llama-operator/llama-operator:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        args,
        [
            "--config",
            "/etc/llama-operator/config.yaml",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--leader-elect",
            "--lease-namespace",
            "llama-system",
            "--lease-name",
            "llama-operator-leader"
        ]
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());

    // Values reach the configuration, and the operator accepts what they render.
    let docs = template(
        &helm,
        "llama-system",
        &[
            "--set",
            "config.serverImage=registry.example/llama-server-cuda:1.2.3",
            "--set-json",
            r#"config.sharedQuota={"StandardNCADSA100v4Family":960}"#,
            "--set-json",
            r#"config.instanceTypes=[{"name":"my-l40s","family":"L40S","cores":16,"memoryGib":128,"gpuType":"L40S","gpuCount":1,"gpuMemoryGib":48,"hourlyPrice":1.2,"currency":"EUR"}]"#,
            "--set",
            "config.karpenter.nodeClassKind=KWOKNodeClass",
        ],
    )?;
    let config = OperatorConfig::parse(&rendered_config(&docs)?)?;
    assert_eq!(
        config.server_image,
        "registry.example/llama-server-cuda:1.2.3"
    );
    assert_eq!(config.shared_quota["StandardNCADSA100v4Family"], 960);
    assert_eq!(
        config.catalog().instance_types["my-l40s"].gpu_memory_gib,
        48
    );
    assert_eq!(config.karpenter.node_class_kind, "KWOKNodeClass");
    Ok(())
}

#[test]
fn service_monitor_is_rendered_only_when_enabled() -> anyhow::Result<()> {
    let helm = Helm::offline()?;
    let default = template(&helm, "llama-system", &[])?;
    assert!(
        !kinds(&default)
            .iter()
            .any(|k| k.starts_with("ServiceMonitor/")),
        "{:?}",
        kinds(&default)
    );
    let enabled = template(
        &helm,
        "llama-system",
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "serviceMonitor.labels.release=prometheus",
        ],
    )?;
    let monitors: Vec<&Value> = enabled
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 1);
    let monitor = monitors[0];
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    // It selects the metrics Service, which exposes the port by that name.
    let service = enabled
        .iter()
        .find(|d| d["kind"] == "Service")
        .ok_or_else(|| anyhow::anyhow!("no metrics Service"))?;
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    Ok(())
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() -> anyhow::Result<()> {
    let env = TestEnv::new("helm-dry-run").await?;
    // The real ServiceMonitor CRD, so the optional ServiceMonitor is validated too.
    testenv::install_crds_from(&env.client, &testenv::helm::prometheus_operator_crds_dir()?)
        .await?;
    let helm = Helm::offline()?;
    let chart = chart();
    for extra in [
        &[][..],
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "replicas=1",
        ][..],
    ] {
        // Its own release name: the cluster-scoped objects (ClusterRoles) must not collide with
        // the install test's, which runs in the same cluster at the same time.
        let mut args = vec![
            "template",
            "dry-run",
            chart.as_str(),
            "--namespace",
            env.namespace.as_str(),
            "--include-crds",
        ];
        args.extend_from_slice(extra);
        let rendered = helm.ok(&args)?;
        let docs = documents(&rendered)?;
        let out = env.run_kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=helm-test",
                "-f",
                "-",
            ],
            Some(&rendered),
        )?;
        assert!(out.success, "{extra:?}: {}", out.stderr);
        // Every rendered object was accepted (the CRDs included).
        let accepted = out
            .stdout
            .matches("serverside-applied (server dry run)")
            .count();
        assert_eq!(accepted, docs.len(), "{}", out.stdout);
        assert!(
            kinds(&docs)
                .iter()
                .any(|k| k.starts_with("CustomResourceDefinition/"))
        );
    }
    Ok(())
}

/// A simulated node (kwok) for the chart's own pods, so that `helm install --wait` sees them
/// scheduled and Ready. The pods are kwok's: they do not run the binary.
fn operator_node_manifest() -> &'static str {
    r#"apiVersion: v1
kind: Node
metadata:
  name: helm-test-system-node
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {kubernetes.io/hostname: helm-test-system-node, kubernetes.io/os: linux, type: kwok}
status:
  capacity: {cpu: "8", memory: 32Gi, pods: "110"}
  allocatable: {cpu: "8", memory: 32Gi, pods: "110"}
"#
}

const QUICKSTART: &str = "apiVersion: llama-operator.io/v1alpha1
kind: LlamaDeployment
metadata: {name: quickstart}
spec:
  model: Meta-Llama-3.2-1B-Instruct
  source: {type: demo}
  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1}
  nodePool: {provider: kwok}
";

#[tokio::test]
async fn helm_install_runs_the_operator_as_its_service_account_then_upgrade_and_uninstall()
-> anyhow::Result<()> {
    let system = TestEnv::new("helm-system").await?;
    let ns = system.namespace.clone();
    let helm = Helm::for_env(&system)?;
    let chart = chart();
    // The chart's pods must pass the restricted Pod Security Standard.
    let out = system.run_kubectl(
        &[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        None,
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let out = system.run_kubectl(&["apply", "-f", "-"], Some(operator_node_manifest()))?;
    anyhow::ensure!(out.success, "{}", out.stderr);

    // Bad values fail the install itself and leave nothing behind.
    let out = helm.run(&[
        "install",
        RELEASE,
        &chart,
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
    assert!(
        !helm
            .ok(&["list", "--namespace", &ns, "-q"])?
            .contains(RELEASE)
    );

    let installed = helm.ok(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        &ns,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    // NOTES.txt tells the user what to do next.
    for words in [
        "kubectl apply -f",
        "kubectl get llamadeployments",
        &format!("kubectl -n {ns} rollout status deployment/{RELEASE}"),
    ] {
        assert!(
            installed.contains(words),
            "{words:?} not in NOTES:\n{installed}"
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(system.client.clone(), &ns);
    let chart_deployment = deployments.get(RELEASE).await?;
    let ready = chart_deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    assert_eq!(
        ready, 2,
        "helm --wait returned before both replicas were ready"
    );
    // helm installed the CRDs from the chart's crds/.
    let out = system.run_kubectl(
        &[
            "get",
            "crd",
            "llamadeployments.llama-operator.io",
            "computequotas.llama-operator.io",
        ],
        None,
    )?;
    assert!(out.success, "{}", out.stderr);

    // Run the real operator as the pods would: the chart's arguments and configuration, the
    // ServiceAccount's identity (a bound token, no admin rights), the downward-API variables.
    let work = system.plane.dir.join(format!("helm-{ns}"));
    std::fs::create_dir_all(&work)?;
    let kubeconfig = work.join("operator.kubeconfig");
    service_account_kubeconfig(&system, &ns, RELEASE, &kubeconfig)?;
    let config_path = work.join("config.yaml");
    let config_maps: Api<ConfigMap> = Api::namespaced(system.client.clone(), &ns);
    let sync_config = || async {
        let cm = config_maps.get(&format!("{RELEASE}-config")).await?;
        let text = cm
            .data
            .and_then(|d| d.get("config.yaml").cloned())
            .ok_or_else(|| anyhow::anyhow!("ConfigMap without config.yaml"))?;
        // As the kubelet updates a mounted ConfigMap: atomically.
        let tmp = config_path.with_extension("tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &config_path)?;
        anyhow::Ok(text)
    };
    sync_config().await?;
    let container = chart_deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .ok_or_else(|| anyhow::anyhow!("chart Deployment without a container"))?;
    let mut args: Vec<String> = container.args.clone().unwrap_or_default();
    let mut replace_value = |flag: &str, value: &str| -> anyhow::Result<()> {
        let at = args
            .iter()
            .position(|a| a == flag)
            .ok_or_else(|| anyhow::anyhow!("chart passes no {flag}: {args:?}"))?;
        args[at + 1] = value.to_owned();
        Ok(())
    };
    // Only the paths and ports of this machine differ from the pod.
    replace_value("--config", &config_path.display().to_string())?;
    replace_value("--metrics-addr", "127.0.0.1:0")?;
    assert!(args.iter().any(|a| a == "--leader-elect"), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pod_name = format!("{RELEASE}-test-replica");
    let op = OperatorProcess::start_as(
        &system,
        Path::new(OPERATOR),
        &args,
        &kubeconfig,
        &[("POD_NAME", &pod_name), ("POD_NAMESPACE", &ns)],
    )?;

    // It leads through the Lease the chart's Role allows.
    let leases: Api<Lease> = Api::namespaced(system.client.clone(), &ns);
    wait_for(Duration::from_secs(30), || async {
        let lease = leases.get("llama-operator-leader").await.ok()?;
        (lease.spec?.holder_identity? == pod_name).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: no leadership\n{}", op.log_text()))?;

    // A deployment in another namespace, under a ComputeQuota: every call the operator makes
    // for it (quota, keys, nodes, server, endpoint, events, finalizer) is made as the account.
    let work_env = TestEnv::new("helm-workload").await?;
    let wns = work_env.namespace.clone();
    let out = work_env.run_kubectl(
        &["apply", "-f", "-"],
        Some("apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: default}\nspec:\n  limits: [{family: StandardNCADSA100v4Family, cores: 96}]\n"),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let out = work_env.run_kubectl(&["apply", "--server-side", "-f", "-"], Some(QUICKSTART))?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let ld = wait_ready(&work_env, &op, "quickstart", 120).await?;
    assert_eq!(
        ld.status.as_ref().and_then(|s| s.endpoint.clone()),
        Some(format!("http://quickstart.{wns}.svc"))
    );
    let quotas: Api<ComputeQuota> = Api::namespaced(work_env.client.clone(), &wns);
    wait_for(Duration::from_secs(30), || async {
        let q = quotas.get("default").await.ok()?;
        let used = q.status?.families.first()?.used;
        (used == 48).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("ComputeQuota status not written: {e}\n{}", op.log_text()))?;
    let events = work_env.run_kubectl(
        &[
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].reportingController}",
        ],
        None,
    )?;
    assert!(
        events.stdout.contains("llama-operator"),
        "no operator Events: {events:?}"
    );

    // User-supplied keys replace the generated Secret, which the operator then deletes.
    let secrets: Api<Secret> = Api::namespaced(work_env.client.clone(), &wns);
    assert!(secrets.get_opt("quickstart-keys").await?.is_some());
    let out = work_env.run_kubectl(
        &[
            "create",
            "secret",
            "generic",
            "my-keys",
            "--from-literal=primaryKey=abcdefghijklmnopqrstuvwxyz012345",
            "--from-literal=secondaryKey=ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
        ],
        None,
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let lds: Api<LlamaDeployment> = Api::namespaced(work_env.client.clone(), &wns);
    lds.patch(
        "quickstart",
        &PatchParams::apply(testenv::FIELD_MANAGER),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "llama-operator.io/v1alpha1", "kind": "LlamaDeployment",
            "spec": {"auth": {"secretRef": {"name": "my-keys"}}},
        })),
    )
    .await?;
    wait_for(Duration::from_secs(30), || async {
        secrets
            .get_opt("quickstart-keys")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("generated Secret kept: {e}\n{}", op.log_text()))?;

    // helm upgrade with changed configuration: the ConfigMap changes, the operator's pods do
    // not restart (the file is re-read), and the change reaches the workload.
    let generation = chart_deployment.metadata.generation;
    helm.ok(&[
        "upgrade",
        RELEASE,
        &chart,
        "--namespace",
        &ns,
        "--reuse-values",
        "--set",
        "config.drainSeconds=90",
        "--wait",
        "--timeout",
        "120s",
    ])?;
    let text = sync_config().await?;
    assert_eq!(OperatorConfig::parse(&text)?.drain_seconds, 90, "{text}");
    assert_eq!(
        deployments.get(RELEASE).await?.metadata.generation,
        generation,
        "a configuration change rolled the operator's pods"
    );
    let servers: Api<Deployment> = Api::namespaced(work_env.client.clone(), &wns);
    wait_for(Duration::from_secs(60), || async {
        let d = servers.get("quickstart").await.ok()?;
        let grace = d.spec?.template.spec?.termination_grace_period_seconds?;
        (grace == 120).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("drainSeconds not applied: {e}\n{}", op.log_text()))?;
    let history = helm.ok(&["history", RELEASE, "--namespace", &ns])?;
    assert!(history.contains("Upgrade complete"), "{history}");

    // Delete: the finalizer releases the simulated GPU node, then the object goes.
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
    let selector = format!("llama-operator.io/deployment-namespace={wns}");
    let nodes = Api::<Node>::all(system.client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?;
    assert!(nodes.items.is_empty(), "nodes left: {:?}", nodes.items);

    // Not one call was refused: the chart's RBAC covers everything the operator did.
    let log = op.log_text();
    assert!(
        !log.to_ascii_lowercase().contains("forbidden"),
        "the operator was refused a call:\n{log}"
    );

    // And the check above would catch a missing rule: without `list pods` the next
    // deployment's reconcile is refused, and the log says so.
    let out = system.run_kubectl(&["get", "clusterrole", RELEASE, "-o", "json"], None)?;
    let mut role: Value = serde_json::from_str(&out.stdout)?;
    if let Some(rules) = role["rules"].as_array_mut() {
        rules.retain(|r| r["resources"] != serde_json::json!(["pods"]));
    }
    let out = system.run_kubectl(&["replace", "-f", "-"], Some(&role.to_string()))?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let out = work_env.run_kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&QUICKSTART.replace("name: quickstart", "name: second")),
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    wait_for(Duration::from_secs(60), || async {
        op.log_text().contains("pods is forbidden").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("no 403 logged: {e}\n{}", op.log_text()))?;
    drop(op);

    // helm uninstall removes what it installed and keeps the CRDs (and so every deployment).
    helm.ok(&[
        "uninstall",
        RELEASE,
        "--namespace",
        &ns,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    for kind in [
        "deployment",
        "serviceaccount",
        "configmap",
        "service",
        "poddisruptionbudget",
        "role",
        "rolebinding",
    ] {
        let out = system.run_kubectl(
            &[
                "get",
                kind,
                "-l",
                &format!("app.kubernetes.io/instance={RELEASE}"),
                "-o",
                "name",
            ],
            None,
        )?;
        assert!(
            out.success && out.stdout.trim().is_empty(),
            "{kind} left: {out:?}"
        );
    }
    for kind in ["clusterrole", "clusterrolebinding"] {
        let out = system.run_kubectl(
            &[
                "get",
                kind,
                "-l",
                &format!("app.kubernetes.io/instance={RELEASE}"),
                "-o",
                "name",
            ],
            None,
        )?;
        assert!(
            out.success && out.stdout.trim().is_empty(),
            "{kind} left: {out:?}"
        );
    }
    let out = system.run_kubectl(
        &[
            "get",
            "crd",
            "llamadeployments.llama-operator.io",
            "computequotas.llama-operator.io",
        ],
        None,
    )?;
    assert!(out.success, "CRDs removed by uninstall: {}", out.stderr);
    assert!(
        quotas.get_opt("default").await?.is_some(),
        "ComputeQuota lost with the CRDs"
    );
    Ok(())
}
