//! A pod's server container as a local `llama-server` process: its arguments (in-pod paths
//! rewritten, `--listen` bound to the pod's address), its environment (references resolved
//! from the API) and its volumes' files.

use super::volumes::Mounts;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret};
use kube::Api;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The port a server listens on when its arguments do not say (the operator's container port).
pub const DEFAULT_PORT: u16 = 8080;

/// Why a pod's container cannot be run here (shown as the container's waiting reason).
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    Unsupported(String),
    #[error("{kind} {name} not found")]
    Missing { kind: &'static str, name: String },
    #[error("reading from the API: {0}")]
    Api(#[from] kube::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ContainerError {
    pub(crate) fn missing(kind: &'static str, name: &str) -> Self {
        Self::Missing {
            kind,
            name: name.to_owned(),
        }
    }
}

/// What `fieldRef` environment variables may name.
#[derive(Debug, Clone, Default)]
pub struct PodFields {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub host_ip: String,
}

/// A container ready to start as a local process.
#[derive(Debug, Clone)]
pub struct LocalContainer {
    /// Arguments, with local paths and the local listen address.
    pub args: Vec<String>,
    /// The container's environment, resolved.
    pub env: Vec<(String, String)>,
    /// The pod's directory on this machine (the process's working directory).
    pub root: PathBuf,
    /// The volumes; [`Mounts::write`] refreshes their files.
    pub mounts: Mounts,
}

/// The pod's one container. The runner runs only pods like the operator's: one container that
/// runs `llama-server` (the image's entrypoint, no `command`), no init containers.
pub fn server_container(spec: &PodSpec) -> Result<&Container, ContainerError> {
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(ContainerError::Unsupported(
            "the pod runner does not run init containers (model sources other than demo)".into(),
        ));
    }
    let [container] = spec.containers.as_slice() else {
        return Err(ContainerError::Unsupported(format!(
            "the pod runner runs pods of exactly one container, not {}",
            spec.containers.len()
        )));
    };
    if container.command.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(ContainerError::Unsupported(format!(
            "container {}: the pod runner runs llama-server with the container's args; it \
             cannot run a command",
            container.name
        )));
    }
    Ok(container)
}

/// The port of the container's `--listen` argument, or [`DEFAULT_PORT`].
pub fn listen_port(container: &Container) -> u16 {
    listen_value(container.args.as_deref().unwrap_or_default())
        .and_then(|v| v.parse::<SocketAddr>().ok())
        .map_or(DEFAULT_PORT, |a| a.port())
}

fn listen_value(args: &[String]) -> Option<&str> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--listen" {
            return iter.next().map(String::as_str);
        }
        if let Some(value) = arg.strip_prefix("--listen=") {
            return Some(value);
        }
    }
    None
}

/// Writes the volumes of `spec`'s container under `root` and resolves its arguments and
/// environment, listening on `listen`.
pub async fn prepare(
    client: &kube::Client,
    pod: &PodFields,
    spec: &PodSpec,
    root: &Path,
    listen: SocketAddr,
) -> Result<LocalContainer, ContainerError> {
    let container = server_container(spec)?;
    let mounts = Mounts::of(spec, container, root)?;
    mounts.write(client, &pod.namespace).await?;
    let args = local_args(
        container.args.as_deref().unwrap_or_default(),
        &mounts,
        listen,
    );
    let env = resolve_env(client, container, pod, listen.ip()).await?;
    Ok(LocalContainer {
        args,
        env,
        root: root.to_path_buf(),
        mounts,
    })
}

/// The container's arguments with in-pod paths rewritten and `--listen` set to `listen`.
fn local_args(args: &[String], mounts: &Mounts, listen: SocketAddr) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut replaced = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--listen" {
            iter.next();
        } else if !arg.starts_with("--listen=") {
            out.push(mounts.rewrite(arg));
            continue;
        }
        out.extend(["--listen".to_owned(), listen.to_string()]);
        replaced = true;
    }
    if !replaced {
        out.extend(["--listen".to_owned(), listen.to_string()]);
    }
    out
}

/// The `llama-server` command for `container`: a clean environment (as in a container) with
/// the demo model's tokenizer, `tmpdir` as TMPDIR, and the container's own variables.
pub fn command(
    binary: &Path,
    container: &LocalContainer,
    tokenizer_dir: &Path,
    tmpdir: &Path,
    log: &Path,
) -> std::io::Result<Command> {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)?;
    // Absolute: a relative path would be looked up from the pod's directory.
    let mut cmd = Command::new(std::path::absolute(binary)?);
    cmd.args(&container.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &container.root)
        .env("LLAMA_SERVER_TOKENIZER_DIR", tokenizer_dir)
        .env("TMPDIR", tmpdir)
        .envs(container.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&container.root)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    Ok(cmd)
}

async fn resolve_env(
    client: &kube::Client,
    container: &Container,
    pod: &PodFields,
    pod_ip: IpAddr,
) -> Result<Vec<(String, String)>, ContainerError> {
    let mut env = Vec::new();
    let mut cache = References::new(client, &pod.namespace);
    for from in container.env_from.as_deref().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            cache.config_map(&r.name, r.optional).await?
        } else if let Some(r) = &from.secret_ref {
            cache.secret(&r.name, r.optional).await?
        } else {
            continue;
        };
        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for var in container.env.as_deref().unwrap_or_default() {
        let value = if let Some(source) = &var.value_from {
            if let Some(r) = &source.secret_key_ref {
                let data = cache.secret(&r.name, r.optional).await?;
                match data.get(&r.key) {
                    Some(v) => v.clone(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(ContainerError::Unsupported(format!(
                            "env {}: Secret {} has no key {}",
                            var.name, r.name, r.key
                        )));
                    }
                }
            } else if let Some(r) = &source.config_map_key_ref {
                let data = cache.config_map(&r.name, r.optional).await?;
                match data.get(&r.key) {
                    Some(v) => v.clone(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(ContainerError::Unsupported(format!(
                            "env {}: ConfigMap {} has no key {}",
                            var.name, r.name, r.key
                        )));
                    }
                }
            } else if let Some(field) = &source.field_ref {
                match field.field_path.as_str() {
                    "metadata.name" => pod.name.clone(),
                    "metadata.namespace" => pod.namespace.clone(),
                    "metadata.uid" => pod.uid.clone(),
                    "spec.nodeName" => pod.node_name.clone(),
                    "status.podIP" => pod_ip.to_string(),
                    "status.hostIP" => pod.host_ip.clone(),
                    other => {
                        return Err(ContainerError::Unsupported(format!(
                            "env {}: the pod runner cannot resolve fieldRef {other}",
                            var.name
                        )));
                    }
                }
            } else {
                return Err(ContainerError::Unsupported(format!(
                    "env {}: the pod runner resolves only value, secretKeyRef, \
                     configMapKeyRef and fieldRef",
                    var.name
                )));
            }
        } else {
            var.value.clone().unwrap_or_default()
        };
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// The ConfigMaps and Secrets an environment refers to, each read once.
struct References<'a> {
    client: &'a kube::Client,
    namespace: &'a str,
    read: BTreeMap<(&'static str, String), BTreeMap<String, String>>,
}

impl<'a> References<'a> {
    fn new(client: &'a kube::Client, namespace: &'a str) -> Self {
        Self {
            client,
            namespace,
            read: BTreeMap::new(),
        }
    }

    async fn config_map(
        &mut self,
        name: &str,
        optional: Option<bool>,
    ) -> Result<BTreeMap<String, String>, ContainerError> {
        let key = ("ConfigMap", name.to_owned());
        if let Some(data) = self.read.get(&key) {
            return Ok(data.clone());
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        let data = match api.get_opt(name).await? {
            Some(cm) => cm.data.unwrap_or_default(),
            None if optional == Some(true) => BTreeMap::new(),
            None => return Err(ContainerError::missing("ConfigMap", name)),
        };
        self.read.insert(key, data.clone());
        Ok(data)
    }

    async fn secret(
        &mut self,
        name: &str,
        optional: Option<bool>,
    ) -> Result<BTreeMap<String, String>, ContainerError> {
        let key = ("Secret", name.to_owned());
        if let Some(data) = self.read.get(&key) {
            return Ok(data.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        let data = match api.get_opt(name).await? {
            Some(secret) => secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect(),
            None if optional == Some(true) => BTreeMap::new(),
            None => return Err(ContainerError::missing("Secret", name)),
        };
        self.read.insert(key, data.clone());
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).expect("pod spec")
    }

    const OPERATOR_POD: &str = r#"
containers:
- name: llama-server
  image: llama-server:dev
  args: [serve, --config, /etc/llama-server/server.yaml, --listen, "0.0.0.0:8080", --drain-seconds, "300"]
  volumeMounts:
  - {name: config, mountPath: /etc/llama-server}
volumes:
- {name: config, configMap: {name: chat-server}}
"#;

    #[test]
    fn args_get_local_paths_and_the_pod_address() {
        let s = spec(OPERATOR_POD);
        let container = server_container(&s).expect("container");
        assert_eq!(listen_port(container), 8080);
        let mounts = Mounts::of(&s, container, Path::new("/r")).expect("mounts");
        let listen: SocketAddr = "10.246.1.2:8080".parse().expect("addr");
        let args = local_args(
            container.args.as_deref().unwrap_or_default(),
            &mounts,
            listen,
        );
        assert_eq!(
            args,
            [
                "serve",
                "--config",
                "/r/volumes/config/server.yaml",
                "--listen",
                "10.246.1.2:8080",
                "--drain-seconds",
                "300"
            ]
        );
        let bare = local_args(&["serve".to_owned()], &mounts, listen);
        assert_eq!(bare, ["serve", "--listen", "10.246.1.2:8080"]);
        let joined = local_args(&["--listen=0.0.0.0:9000".to_owned()], &mounts, listen);
        assert_eq!(joined, ["--listen", "10.246.1.2:8080"]);
    }

    #[test]
    fn pods_the_runner_cannot_run_are_refused_with_a_reason() {
        let with_init = spec(&format!(
            "{OPERATOR_POD}initContainers:\n- {{name: fetch-model, image: x}}\n"
        ));
        assert!(
            server_container(&with_init)
                .expect_err("init")
                .to_string()
                .contains("init containers")
        );
        let with_command = spec(&OPERATOR_POD.replace(
            "  image: llama-server:dev\n",
            "  image: llama-server:dev\n  command: [sh]\n",
        ));
        assert!(
            server_container(&with_command)
                .expect_err("command")
                .to_string()
                .contains("cannot run a command")
        );
    }
}
