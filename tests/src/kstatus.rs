//! What Flux makes of an object: Flux's kstatus (`github.com/fluxcd/cli-utils`, the library
//! behind kustomize-controller's health checks), run by `tools/kstatus`, built by
//! `scripts/build-kstatus.sh`.

use crate::control_plane;
use std::path::PathBuf;
use std::process::Command;

/// The directory of the built `kstatus`: `LLAMA_KSTATUS_BIN`, or what
/// `scripts/build-kstatus.sh` prints.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir("LLAMA_KSTATUS_BIN", "scripts/build-kstatus.sh")
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
