//! What Flux makes of an object: Flux's kstatus (`github.com/fluxcd/cli-utils`, the library
//! behind kustomize-controller's health checks), run by `tools/kstatus`, built by
//! `scripts/build-kstatus.sh`.

use crate::control_plane;
use anyhow::Context as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The directory of the built `kstatus`: `LLAMA_KSTATUS_BIN`, or what
/// `scripts/build-kstatus.sh` prints.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LLAMA_KSTATUS_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = control_plane::workspace_root().join("scripts/build-kstatus.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    anyhow::ensure!(out.status.success(), "{} failed", script.display());
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// kstatus's verdict on `object`: (status — `Current`, `InProgress`, `Failed`, … — and message).
pub fn status(object: &serde_json::Value) -> anyhow::Result<(String, String)> {
    let cmd = Command::new(bin_dir()?.join("kstatus"));
    let out = crate::run(cmd, &[], Some(&object.to_string()))?;
    anyhow::ensure!(out.success, "kstatus: {}", out.stderr);
    let verdict: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let field = |k: &str| verdict[k].as_str().unwrap_or_default().to_owned();
    Ok((field("status"), field("message")))
}
