//! The README's main command: `scripts/demo.sh` runs `dev-cluster` with the chart, the operator,
//! the server and `examples/quickstart.yaml`. This runs the same binary the same way (debug
//! builds, `--exit` instead of waiting for Ctrl-C) and checks the story it tells: the chart is
//! installed, the operator runs as the chart's ServiceAccount, the deployment becomes Ready on a
//! simulated GPU node, and a real llama-server behind the pod answers a chat completion through
//! the address the Service's EndpointSlice lists.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testenv::control_plane::workspace_root;
use testenv::local_server::server_binary;
use testenv::operator::operator_binary;

#[test]
fn the_demo_answers_a_chat_completion_through_the_deployments_endpoint() -> anyhow::Result<()> {
    let root = workspace_root();
    let dir = tempdir()?;
    let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dev-cluster"))
        .arg("--operator")
        .arg(operator_binary()?)
        .arg("--chart")
        .arg(root.join("charts/llama-operator"))
        .arg("--server")
        .arg(server_binary()?)
        .arg("--pod-runner")
        .arg("--apply")
        .arg(root.join("examples/quickstart.yaml"))
        .arg("--exit")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            anyhow::bail!(
                "dev-cluster did not finish in 300 s:\n{}\n{}",
                std::fs::read_to_string(&stdout)?,
                std::fs::read_to_string(&stderr)?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&stdout)?;
    let err = std::fs::read_to_string(&stderr)?;
    assert!(
        status.success(),
        "dev-cluster failed ({status}):\n{out}\n{err}"
    );
    for expected in [
        "helm install llama-operator",
        "llama-operator running as the chart's ServiceAccount",
        "opted in to the pod runner",
        "condition met",
        "Standard_NC24ads_A100_v4",
        "its EndpointSlice lists http://10.246.",
        "chat completion answered through the endpoint address http://10.246.",
        "\"finish_reason\"",
        "--exit given",
    ] {
        assert!(
            out.contains(expected),
            "{expected:?} missing from:\n{out}\n{err}"
        );
    }
    // Every step reports its own duration and the running total.
    assert!(out.contains(" s in all)"), "{out}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
