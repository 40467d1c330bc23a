//! The Helm chart `charts/llama-operator` with the real `helm` (built by scripts/build-helm.sh):
//! its CRDs, lint, values schema, what it renders, and that rendering checked by the API server.
//! The install itself is in helm_install.rs.

use llama_operator::config::OperatorConfig;
use serde_json::Value;
use std::path::Path;
use testenv::TestEnv;
use testenv::helm::{Helm, chart_dir, documents};

/// The release name; with it every object is named `llama-operator`.
const RELEASE: &str = "llama-operator";

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
            "ghcr.io/llama-operator/llama-server-cuda:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        config.fetch_image,
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
        let mut args = vec![
            "template",
            RELEASE,
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
