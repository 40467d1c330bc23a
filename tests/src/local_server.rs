//! A real `llama-server` process configured from a LlamaDeployment's own objects — the
//! `<name>-server` ConfigMap and the keys Secret the operator wrote — listening on loopback.
//!
//! The pods of the test cluster are kwok's: nothing runs inside them. This stands in for the
//! server container of one pod, on this machine only, so that the demo and the tests can send a
//! chat completion to exactly the configuration the operator produced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

/// A running server and how to call it.
#[derive(Debug)]
pub struct LocalServer {
    pub endpoint: String,
    pub key: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: std::process::Child,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Starts `binary` with the configuration and keys of LlamaDeployment `namespace/name` and
/// waits until it is ready.
pub async fn start_for(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    binary: &Path,
    workdir: &Path,
) -> anyhow::Result<LocalServer> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config = config_maps.get(&format!("{name}-server")).await?;
    let text = config
        .data
        .as_ref()
        .and_then(|d| d.get("server.yaml"))
        .ok_or_else(|| anyhow::anyhow!("ConfigMap {name}-server has no server.yaml"))?;
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text)?;
    // The in-pod paths become local ones; everything else is exactly what the operator wrote.
    let dir = workdir.join(format!("{namespace}-{name}"));
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    yaml["auth"]["keysDir"] = serde_yaml::Value::from(keys_dir.display().to_string());
    let config_path = dir.join("server.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&yaml)?)?;

    let secret_name = format!("{name}-keys");
    let secret = secrets.get(&secret_name).await?;
    let data = secret.data.unwrap_or_default();
    let mut key = String::new();
    for file in ["primaryKey", "secondaryKey"] {
        if let Some(value) = data.get(file) {
            let text = String::from_utf8(value.0.clone())?;
            if file == "primaryKey" {
                key = text.clone();
            }
            std::fs::write(keys_dir.join(file), text)?;
        }
    }
    anyhow::ensure!(!key.is_empty(), "Secret {secret_name} has no primaryKey");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = dir.join("llama-server.log");
    let file = std::fs::File::create(&log)?;
    let child = std::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("LLAMA_SERVER_TOKENIZER_DIR", tokenizer_dir()?)
        .env("TMPDIR", &dir)
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let server = LocalServer {
        endpoint: format!("http://127.0.0.1:{port}"),
        key,
        dir,
        log,
        child,
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
        let response = reqwest::Client::new()
            .post(format!("{}/chat/completions", self.endpoint))
            .header("api-key", &self.key)
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
}
