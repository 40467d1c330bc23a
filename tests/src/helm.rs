//! The real `helm` (built from its Go module by `scripts/build-helm.sh`), the chart, and what the
//! tests need to run the operator as the chart's ServiceAccount.

use crate::{KubectlOutput, TestEnv, control_plane};
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The chart in this repository, or a copy at `LLAMA_CHART_DIR` (scripts/check-rbac.sh runs the
/// install test on copies with one RBAC verb removed).
pub fn chart_dir() -> PathBuf {
    match std::env::var_os("LLAMA_CHART_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => control_plane::workspace_root().join("charts/llama-operator"),
    }
}

/// The directory of the built `helm`: `LLAMA_HELM_BIN`, or what `scripts/build-helm.sh` prints
/// (it builds helm on first use and caches it), as for the control-plane binaries.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir("LLAMA_HELM_BIN", "scripts/build-helm.sh")
}

/// The Prometheus Operator's ServiceMonitor CRD directory: `LLAMA_PROMETHEUS_OPERATOR_CRDS`, or
/// what `scripts/fetch-prometheus-operator-crds.sh` prints.
pub fn prometheus_operator_crds_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir(
        "LLAMA_PROMETHEUS_OPERATOR_CRDS",
        "scripts/fetch-prometheus-operator-crds.sh",
    )
}

/// `helm` with its state (cache, config, data) in a private directory, so that the tests never
/// read or write the user's helm configuration.
#[derive(Debug)]
pub struct Helm {
    binary: PathBuf,
    home: tempfile::TempDir,
    kubeconfig: Option<PathBuf>,
}

impl Helm {
    /// `helm` without a cluster (lint, template).
    pub fn offline() -> anyhow::Result<Self> {
        Ok(Self {
            binary: bin_dir()?.join("helm"),
            home: tempfile::tempdir().context("helm home")?,
            kubeconfig: None,
        })
    }

    /// `helm` acting as the test control plane's admin.
    pub fn for_env(env: &TestEnv) -> anyhow::Result<Self> {
        let mut helm = Self::offline()?;
        helm.kubeconfig = Some(env.plane.kubeconfig.clone());
        Ok(helm)
    }

    /// The command, with its environment set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        let home = self.home.path();
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT");
        match &self.kubeconfig {
            Some(path) => cmd.env("KUBECONFIG", path),
            // No cluster: make sure nothing reaches one by accident.
            None => cmd.env("KUBECONFIG", home.join("no-cluster")),
        };
        cmd
    }

    /// Runs helm with `args`.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<KubectlOutput> {
        crate::run(self.command(), args, None)
    }

    /// Runs helm with `args` and fails with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        anyhow::ensure!(
            out.success,
            "helm {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        Ok(out.stdout)
    }
}

/// A kubeconfig that authenticates as ServiceAccount `account` of `namespace` with a bound token
/// from the TokenRequest API (`kubectl create token`): the identity the chart's pods run as.
pub fn service_account_kubeconfig(
    env: &TestEnv,
    namespace: &str,
    account: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let out = crate::run(
        env.plane.kubectl(),
        &[
            "create",
            "token",
            account,
            "--namespace",
            namespace,
            "--duration",
            "2h",
        ],
        None,
    )?;
    anyhow::ensure!(out.success, "kubectl create token: {}", out.stderr);
    let token = out.stdout.trim();
    anyhow::ensure!(!token.is_empty(), "kubectl create token printed no token");
    let ca_pem = std::fs::read_to_string(env.plane.dir.join("pki/ca.crt"))
        .context("read the control plane's CA")?;
    crate::kubeconfig::write_token(
        path,
        &env.plane.server,
        &ca_pem,
        token,
        &format!("system:serviceaccount:{namespace}:{account}"),
    )
    .with_context(|| format!("write {}", path.display()))
}

/// The documents of a multi-document YAML stream (`helm template` output), empty ones dropped.
pub fn documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}
