//! `testenv`: the proving ground for llama-operator — a real Kubernetes control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok) on loopback, one per test
//! binary, with one namespace per test.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let env = testenv::TestEnv::new("my-test").await?;
//! env.install_crds().await?;
//! // env.client is a kube::Client with admin rights; env.namespace is fresh.
//! # Ok(()) }
//! ```

pub mod argocd;
pub mod chart_install;
pub mod control_plane;
pub mod helm;
pub mod karpenter;
pub mod kstatus;
pub mod kubeconfig;
pub mod kwok_stages;
pub mod llama;
pub mod local_server;
pub mod operator;
pub mod pki;
pub mod pod_runner;
pub mod processes;

pub use control_plane::ControlPlane;
pub use operator::OperatorProcess;
pub use pod_runner::PodRunner;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::future::Future;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Field manager the tests apply with.
pub const FIELD_MANAGER: &str = "llama-operator-tests";

/// A test's view of the shared control plane: an admin client and a namespace of its own.
pub struct TestEnv {
    pub plane: &'static ControlPlane,
    pub client: kube::Client,
    pub namespace: String,
}

impl TestEnv {
    /// Starts the control plane if this binary has not yet, and creates a fresh namespace.
    pub async fn new(test_name: &str) -> anyhow::Result<Self> {
        let plane = tokio::task::spawn_blocking(ControlPlane::shared)
            .await
            .context("control-plane start-up task")?
            .map_err(|err| anyhow::anyhow!("control plane did not start: {err}"))?;
        let client = client_for(&plane.kubeconfig).await?;
        let namespace = unique_namespace(test_name);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {namespace}"))?;
        // Pods can be created only once the controller-manager has made the namespace's
        // default ServiceAccount, as in any real cluster.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        wait_for(Duration::from_secs(30), || async {
            accounts.get_opt("default").await.ok()?
        })
        .await
        .with_context(|| format!("no default ServiceAccount in {namespace}"))?;
        Ok(Self {
            plane,
            client,
            namespace,
        })
    }

    /// Applies the CRDs from `crds/` (server-side apply) and waits until they are Established.
    pub async fn install_crds(&self) -> anyhow::Result<Vec<String>> {
        install_crds(&self.client).await
    }

    /// `kubectl` against the control plane, in this test's namespace.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.plane.kubectl();
        cmd.args(["--namespace", &self.namespace]);
        cmd
    }

    /// Runs `kubectl` with `args` in this test's namespace, optionally feeding `stdin`.
    pub fn run_kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<KubectlOutput> {
        run(self.kubectl(), args, stdin)
    }
}

/// What a kubectl invocation printed and how it ended.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

pub(crate) fn run(
    mut cmd: Command,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<KubectlOutput> {
    use std::io::Write;
    use std::process::Stdio;
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().context("spawn kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .context("write kubectl stdin")?;
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().context("wait kubectl")?;
    Ok(KubectlOutput {
        success: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// A client for the given kubeconfig, bound to the calling test's runtime.
pub async fn client_for(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).context("read kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("load kubeconfig")?;
    kube::Client::try_from(config).context("build client")
}

/// Applies every CRD under `crds/` and waits until each is Established. Returns their names.
pub async fn install_crds(client: &kube::Client) -> anyhow::Result<Vec<String>> {
    install_crds_from(client, &control_plane::workspace_root().join("crds")).await
}

/// Applies every CRD in `dir` and waits until each is Established. Returns their names.
pub async fn install_crds_from(
    client: &kube::Client,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("apply {}", path.display()))?;
        names.push(name);
    }
    for name in &names {
        wait_for(Duration::from_secs(30), || async {
            let crd = api.get(name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await
        .with_context(|| format!("CRD {name} not Established"))?;
    }
    Ok(names)
}

/// Polls `probe` every 100 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            anyhow::bail!("condition not met within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unique_namespace(test_name: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut base: String = test_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(40);
    let base = base.trim_matches('-');
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t-{base}-{}-{n}", std::process::id() % 100_000)
}
