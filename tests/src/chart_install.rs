//! The operator installed the way users install it: `helm install` of the chart, then the real
//! `llama-operator` binary run with the chart Deployment's arguments, the chart's configuration
//! ConfigMap and a token of the chart's ServiceAccount — its RBAC, not admin. (The chart's own
//! pods are kwok's: nothing runs inside them, so this process stands in for one replica.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ControlPlane;

/// The release name and namespace the demo installs.
pub const RELEASE: &str = "llama-operator";
pub const NAMESPACE: &str = "llama-system";

fn kubectl(plane: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = plane.kubectl().args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm install` of `chart` into [`NAMESPACE`]; returns helm's NOTES.
pub fn helm_install(plane: &ControlPlane, chart: &Path) -> anyhow::Result<String> {
    let helm = crate::helm::bin_dir()?.join("helm");
    let home = plane.dir.join("helm-home");
    let out = Command::new(helm)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(["install", RELEASE])
        .arg(chart)
        .args(["--namespace", NAMESPACE, "--create-namespace"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `binary` as the chart's pod would run it; returns its log file.
pub fn run_operator_as_chart(plane: &ControlPlane, binary: &Path) -> anyhow::Result<PathBuf> {
    let token = kubectl(
        plane,
        &[
            "create",
            "token",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--duration",
            "24h",
        ],
    )?;
    let ca_pem = std::fs::read_to_string(plane.dir.join("pki/ca.crt"))?;
    let kubeconfig = plane.dir.join("operator-sa.kubeconfig");
    crate::kubeconfig::write_token(
        &kubeconfig,
        &plane.server,
        &ca_pem,
        token.trim(),
        &format!("system:serviceaccount:{NAMESPACE}:{RELEASE}"),
    )?;
    let config = kubectl(
        plane,
        &[
            "get",
            "configmap",
            &format!("{RELEASE}-config"),
            "--namespace",
            NAMESPACE,
            "-o",
            "jsonpath={.data.config\\.yaml}",
        ],
    )?;
    let config_path = plane.dir.join("operator-config.yaml");
    std::fs::write(&config_path, config)?;
    let args = kubectl(
        plane,
        &[
            "get",
            "deployment",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ],
    )?;
    let mut args: Vec<String> = serde_json::from_str(&args)?;
    // Only the file path and the metrics port differ on this machine.
    for (flag, value) in [
        ("--config", config_path.display().to_string()),
        ("--metrics-addr", "127.0.0.1:0".to_owned()),
    ] {
        let at = args
            .iter()
            .position(|a| a == flag)
            .ok_or_else(|| anyhow::anyhow!("the chart passes no {flag}: {args:?}"))?;
        args[at + 1] = value;
    }
    let log = plane.dir.join("llama-operator.log");
    let file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(binary);
    cmd.args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", format!("{RELEASE}-local"))
        .env("POD_NAMESPACE", NAMESPACE)
        .stdout(file.try_clone()?)
        .stderr(file);
    crate::processes::spawn("llama-operator", cmd)?;
    Ok(log)
}
