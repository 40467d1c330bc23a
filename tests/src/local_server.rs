//! A real `llama-server` process configured from a LlamaDeployment's own objects — the
//! `<name>-server` ConfigMap and the keys Secret the operator wrote — listening on loopback.
//!
//! The pods of the test cluster are kwok's: nothing runs inside them. This stands in for the
//! server container of one pod, on this machine only, so that the demo and the tests can send a
//! chat completion to exactly the configuration the operator produced. (To run every pod of a
//! deployment, each behind its pod IP and readiness, see [`crate::pod_runner`].)

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pod_runner::{PodFields, prepare, server_command};
use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

/// A running server and how to call it.
#[derive(Debug)]
pub struct LocalServer {
    pub endpoint: String,
    pub key: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pid: u32,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        crate::processes::stop(self.pid, Duration::ZERO);
    }
}

/// The `llama-server` binary: `$LLAMA_SERVER_BIN`, or the workspace's debug build (built on
/// first use).
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/debug/llama-server");
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "llama-server", "--bin", "llama-server"])
            .current_dir(&root)
            .status()?;
        anyhow::ensure!(status.success(), "cargo build -p llama-server failed");
    }
    Ok(path)
}

/// The Llama 3 tokenizer directory for the demo model: `$LLAMA_TOKENIZER_DIR`, or what
/// scripts/setup-tokenizer.sh prints.
pub fn tokenizer_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LLAMA_TOKENIZER_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-tokenizer.sh");
    let out = std::process::Command::new("bash").arg(script).output()?;
    anyhow::ensure!(out.status.success(), "scripts/setup-tokenizer.sh failed");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Starts `binary` as the server container of LlamaDeployment `namespace/name` — the pod
/// template of its Deployment, with the volumes (ConfigMap, keys Secret) and arguments the
/// operator wrote — listening on a free loopback port, and waits until it is ready.
pub async fn start_for(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    binary: &Path,
    workdir: &Path,
) -> anyhow::Result<LocalServer> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = deployments
        .get(name)
        .await
        .with_context(|| format!("Deployment {namespace}/{name}"))?;
    let spec = deployment
        .spec
        .and_then(|s| s.template.spec)
        .with_context(|| format!("Deployment {namespace}/{name} has no pod template"))?;

    let key = primary_key(client, namespace, name).await?;

    // The in-pod paths become local ones; everything else is exactly what the operator wrote.
    let dir = workdir.join(format!("{namespace}-{name}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let fields = PodFields {
        name: format!("{name}-local"),
        namespace: namespace.to_owned(),
        host_ip: "127.0.0.1".into(),
        ..PodFields::default()
    };
    let container = prepare(
        client,
        &fields,
        &spec,
        &dir,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await
    .with_context(|| format!("the server container of {namespace}/{name}"))?;
    let log = dir.join("llama-server.log");
    let pid = crate::processes::spawn(
        "llama-server",
        server_command(binary, &container, &tokenizer_dir()?, &dir, &log)?,
    )?;
    let server = LocalServer {
        endpoint: format!("http://127.0.0.1:{port}"),
        key,
        dir,
        log,
        pid,
    };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(response) = http
            .get(format!("{}/health/ready", server.endpoint))
            .send()
            .await
            && response.status().is_success()
        {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!(
        "llama-server for {namespace}/{name} not ready: {}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    )
}

impl LocalServer {
    /// Sends one chat completion with the deployment's primary key; returns the JSON answer.
    pub async fn chat(&self, content: &str, max_tokens: u32) -> anyhow::Result<serde_json::Value> {
        chat(&self.endpoint, &self.key, content, max_tokens).await
    }
}

/// The primary key of LlamaDeployment `namespace/name` (its `<name>-keys` Secret).
pub async fn primary_key(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_name = format!("{name}-keys");
    let secret = secrets
        .get(&secret_name)
        .await
        .with_context(|| format!("Secret {namespace}/{secret_name}"))?;
    let key = secret
        .data
        .unwrap_or_default()
        .get("primaryKey")
        .map(|v| String::from_utf8(v.0.clone()))
        .transpose()?
        .unwrap_or_default();
    anyhow::ensure!(!key.is_empty(), "Secret {secret_name} has no primaryKey");
    Ok(key)
}

/// POSTs one chat completion to `endpoint` (e.g. `http://10.246.1.1:8080`) with `key`; returns
/// the JSON answer, or an error with the status and body of any other answer than 2xx.
pub async fn chat(
    endpoint: &str,
    key: &str,
    content: &str,
    max_tokens: u32,
) -> anyhow::Result<serde_json::Value> {
    let response = reqwest::Client::new()
        .post(format!("{endpoint}/chat/completions"))
        .header("api-key", key)
        .json(&serde_json::json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }))
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {body}");
    Ok(body)
}
