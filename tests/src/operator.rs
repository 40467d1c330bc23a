//! Runs the real `llama-operator` binary against the test control plane.

use crate::TestEnv;
use crate::processes;
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `llama-operator` binary: `$LLAMA_OPERATOR_BIN`, or the workspace's debug build, brought
/// up to date with `cargo build` (for tests outside the operator crate, which have no
/// `CARGO_BIN_EXE_llama-operator`).
pub fn operator_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_OPERATOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = crate::control_plane::workspace_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "llama-operator", "--bin", "llama-operator"])
        .current_dir(&root)
        .status()
        .context("run cargo build -p llama-operator")?;
    anyhow::ensure!(status.success(), "cargo build -p llama-operator failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/llama-operator"))
}

/// A running operator process; stopped (SIGTERM) when dropped.
pub struct OperatorProcess {
    pid: u32,
    pub log: std::path::PathBuf,
}

impl OperatorProcess {
    /// Starts `binary` serving only the test's namespace, with `extra` arguments.
    pub fn start(env: &TestEnv, binary: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec![
            "--namespace",
            env.namespace.as_str(),
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Self::start_as(env, binary, &args, &env.plane.kubeconfig, &[])
    }

    /// Starts `binary` with exactly `args`, connecting with `kubeconfig` (e.g. a
    /// ServiceAccount's, not the admin's) and with the extra environment `vars`.
    pub fn start_as(
        env: &TestEnv,
        binary: &Path,
        args: &[&str],
        kubeconfig: &Path,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = env
            .plane
            .dir
            .join(format!("operator-{}-{}.log", env.namespace, unique()));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn,llama_operator=debug")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let pid = processes::spawn("llama-operator", cmd)?;
        Ok(Self { pid, log })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(self) {
        processes::stop(self.pid, Duration::ZERO);
    }

    /// The operator's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        processes::stop(self.pid, Duration::from_secs(5));
    }
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
