//! Shared by the autoscaling tests and the autoscaling trace benchmark: a namespace on the test
//! control plane with the operator and a pod runner (real `llama-server` processes behind the
//! simulated pods), deployments whose pods it runs, and `llama-load` as the load.

use k8s_openapi::api::core::v1::{Event, Node, Pod, Secret};
use kube::api::{Api, ListParams};
use llama_operator::api::{AutoscalingStatus, InstanceCounts, LlamaDeployment};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testenv::pod_runner::{POD_RUNNER_LABEL, PodRunner};
use testenv::{OperatorProcess, TestEnv, wait_for};

pub const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

/// A deployment of the demo model on kwok nodes whose pods run real servers.
pub fn spec(start: i32, min: i32, max: i32, autoscaling: &str) -> String {
    format!(
        "  model: Meta-Llama-3.2-1B-Instruct\n  source: {{type: demo}}\n  compute:\n    instanceType: Standard_NC24ads_A100_v4\n    instanceCount: {start}\n    minInstances: {min}\n    maxInstances: {max}\n    autoscaling: {autoscaling}\n  rateLimits: {{requestsPerMinute: 1000000, tokensPerMinute: 1000000000}}\n  nodePool: {{provider: kwok, nodeSelector: {{{POD_RUNNER_LABEL}: real}}}}\n"
    )
}

pub struct Cluster {
    pub env: TestEnv,
    pub op: OperatorProcess,
    pub runner: PodRunner,
}

pub async fn cluster(name: &str) -> anyhow::Result<Cluster> {
    let env = TestEnv::new(name).await?;
    env.install_crds().await?;
    let binary = tokio::task::spawn_blocking(testenv::local_server::server_binary).await??;
    let runner = PodRunner::start(env.client.clone(), &env.namespace, &binary).await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    Ok(Cluster { env, op, runner })
}

impl Cluster {
    pub fn api(&self) -> Api<LlamaDeployment> {
        Api::namespaced(self.env.client.clone(), &self.env.namespace)
    }

    pub async fn state(&self, name: &str) -> Option<(InstanceCounts, AutoscalingStatus)> {
        let status = self.api().get(name).await.ok()?.status?;
        Some((status.instances?, status.autoscaling?))
    }

    pub async fn nodes(&self, name: &str) -> anyhow::Result<usize> {
        let sel = format!(
            "llama-operator.io/deployment-namespace={},llama-operator.io/deployment={name}",
            self.env.namespace
        );
        Ok(Api::<Node>::all(self.env.client.clone())
            .list(&ListParams::default().labels(&sel))
            .await?
            .items
            .len())
    }

    pub async fn pods(&self, name: &str) -> anyhow::Result<Vec<Pod>> {
        Ok(
            Api::<Pod>::namespaced(self.env.client.clone(), &self.env.namespace)
                .list(
                    &ListParams::default().labels(&format!("llama-operator.io/deployment={name}")),
                )
                .await?
                .items,
        )
    }

    /// The endpoint of one ready server of `name`, and the deployment's key.
    pub async fn endpoint(&self, name: &str) -> anyhow::Result<(String, String)> {
        let secret = Api::<Secret>::namespaced(self.env.client.clone(), &self.env.namespace)
            .get(&format!("{name}-keys"))
            .await?;
        let key = secret
            .data
            .and_then(|d| d.get("primaryKey").cloned())
            .ok_or_else(|| anyhow::anyhow!("no primaryKey"))?;
        let key = String::from_utf8(key.0)?;
        let pods = self.pods(name).await?;
        let ip = pods
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .find_map(|p| p.status.as_ref()?.pod_ip.clone())
            .ok_or_else(|| anyhow::anyhow!("no ready pod of {name}"))?;
        Ok((format!("http://{ip}:8080"), key))
    }

    pub async fn events(&self, reason: &str) -> anyhow::Result<Vec<String>> {
        Ok(
            Api::<Event>::namespaced(self.env.client.clone(), &self.env.namespace)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .filter_map(|e| e.message)
                .collect(),
        )
    }

    /// Waits for `probe`, failing with the operator's log and the pod runner's events.
    pub async fn wait<T, F, Fut>(&self, what: &str, secs: u64, probe: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_for(Duration::from_secs(secs), probe)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{what}: {e}\noperator log:\n{}\npod runner:\n{}",
                    self.op.log_text(),
                    self.runner.events()
                )
            })
    }
}

/// The `llama-load` binary: `$LLAMA_LOAD_BIN`, or the debug build (built on first use).
pub fn load_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_LOAD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/debug/llama-load");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "llama-server", "--bin", "llama-load"])
            .current_dir(&root)
            .status()?;
        anyhow::ensure!(status.success(), "cargo build --bin llama-load failed");
    }
    Ok(path)
}

/// Sustained load: `clients` streaming clients against `endpoint` until stopped.
pub struct Load(Option<Child>);

impl Load {
    pub fn start(endpoint: &str, key: &str, clients: usize) -> anyhow::Result<Self> {
        let child = Command::new(load_binary()?)
            .args(["--endpoint", endpoint, "--key", key])
            .args(["--clients", &clients.to_string()])
            .args(["--seconds", "600", "--max-tokens", "48"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self(Some(child)))
    }

    /// Runs `llama-load` for `seconds` in the background; [`Load::report`] waits for its summary.
    pub fn run_for(
        endpoint: &str,
        key: &str,
        clients: usize,
        seconds: u64,
    ) -> anyhow::Result<Self> {
        let child = Command::new(load_binary()?)
            .args(["--endpoint", endpoint, "--key", key])
            .args(["--clients", &clients.to_string()])
            .args(["--seconds", &seconds.to_string(), "--max-tokens", "48"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Self(Some(child)))
    }

    /// Waits for a [`Load::run_for`] to end and returns what it printed.
    pub fn report(mut self) -> anyhow::Result<String> {
        let child = self
            .0
            .take()
            .ok_or_else(|| anyhow::anyhow!("no load running"))?;
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
