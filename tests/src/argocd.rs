//! Argo CD's resource health checks (Lua), run by `tools/argocd-health` — Argo CD's interpreter,
//! gopher-lua — built by `scripts/build-argocd-health.sh`.

use crate::control_plane;
use std::path::PathBuf;
use std::process::Command;

/// The health check documented for LlamaDeployments.
pub fn llamadeployment_health_script() -> PathBuf {
    control_plane::workspace_root().join("docs/argocd/llamadeployment-health.lua")
}

/// The directory of the built `argocd-health`: `LLAMA_ARGOCD_HEALTH_BIN`, or what
/// `scripts/build-argocd-health.sh` prints.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir("LLAMA_ARGOCD_HEALTH_BIN", "scripts/build-argocd-health.sh")
}

/// Argo CD's verdict on `object`: (status, message).
pub fn health(object: &serde_json::Value) -> anyhow::Result<(String, String)> {
    let mut cmd = Command::new(bin_dir()?.join("argocd-health"));
    cmd.arg(llamadeployment_health_script());
    let out = crate::run(cmd, &[], Some(&object.to_string()))?;
    anyhow::ensure!(out.success, "argocd-health: {}", out.stderr);
    let verdict: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let field = |k: &str| verdict[k].as_str().unwrap_or_default().to_owned();
    Ok((field("status"), field("message")))
}
