//! A pod's volumes as directories on this machine, and the in-pod paths that name them.
//!
//! Each volume a container mounts becomes `<root>/volumes/<volume name>`: ConfigMaps and Secrets
//! written out key by key (as the kubelet projects them), emptyDirs created empty. The process
//! does not run in a mount namespace, so in-pod paths are rewritten instead: in its arguments,
//! and in the YAML files of its ConfigMap volumes (e.g. `auth.keysDir` in `server.yaml`).

use super::container::ContainerError;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, PodSpec, Secret, Volume};
use kube::Api;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where each of a container's mount paths is on this machine.
#[derive(Debug, Clone)]
pub struct Mounts {
    root: PathBuf,
    /// (mount path, local path, volume), longest mount path first so nested mounts win.
    entries: Vec<(String, PathBuf, Volume)>,
}

impl Mounts {
    /// The mounts of `container`, each volume in `root/volumes/<volume name>`.
    pub fn of(spec: &PodSpec, container: &Container, root: &Path) -> Result<Self, ContainerError> {
        let volumes = spec.volumes.as_deref().unwrap_or_default();
        let mut entries = Vec::new();
        for mount in container.volume_mounts.as_deref().unwrap_or_default() {
            let volume = volumes
                .iter()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| {
                    ContainerError::Unsupported(format!(
                        "volumeMount {} names no volume of the pod",
                        mount.name
                    ))
                })?;
            if volume.config_map.is_none() && volume.secret.is_none() && volume.empty_dir.is_none()
            {
                return Err(ContainerError::Unsupported(format!(
                    "volume {}: the pod runner provides only configMap, secret and emptyDir \
                     volumes",
                    volume.name
                )));
            }
            let mut local = root.join("volumes").join(&volume.name);
            if let Some(sub) = mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                local = local.join(sub);
            }
            entries.push((
                mount.mount_path.trim_end_matches('/').to_owned(),
                local,
                volume.clone(),
            ));
        }
        entries.sort_by_key(|(path, _, _)| std::cmp::Reverse(path.len()));
        Ok(Self {
            root: root.to_path_buf(),
            entries,
        })
    }

    /// The local path of an absolute in-pod path under one of the mounts.
    pub fn local(&self, in_pod: &str) -> Option<PathBuf> {
        self.entries.iter().find_map(|(mount, local, _)| {
            let rest = in_pod.strip_prefix(mount.as_str())?;
            match rest.strip_prefix('/') {
                Some(rest) => Some(local.join(rest)),
                None if rest.is_empty() => Some(local.clone()),
                None => None,
            }
        })
    }

    /// `text` with an in-pod path (alone, or after `--flag=`) replaced by its local path.
    pub fn rewrite(&self, text: &str) -> String {
        if let Some(local) = self.local(text) {
            return local.display().to_string();
        }
        if let Some((flag, value)) = text.split_once('=')
            && let Some(local) = self.local(value)
        {
            return format!("{flag}={}", local.display());
        }
        text.to_owned()
    }

    /// Rewrites every string of `value` that is an in-pod path under one of the mounts.
    pub fn rewrite_yaml(&self, value: &mut Value) {
        match value {
            Value::String(text) => {
                if let Some(local) = self.local(text) {
                    *text = local.display().to_string();
                }
            }
            Value::Sequence(items) => items.iter_mut().for_each(|v| self.rewrite_yaml(v)),
            Value::Mapping(map) => map.values_mut().for_each(|v| self.rewrite_yaml(v)),
            Value::Tagged(tagged) => self.rewrite_yaml(&mut tagged.value),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    /// Writes every mounted volume's content (again): files change only when their content does,
    /// so a server that watches its key files sees a rotation as it would in a pod.
    pub async fn write(
        &self,
        client: &kube::Client,
        namespace: &str,
    ) -> Result<(), ContainerError> {
        let mut written = std::collections::BTreeSet::new();
        for (_, _, volume) in &self.entries {
            if !written.insert(volume.name.as_str()) {
                continue;
            }
            let dir = self.volume_dir(volume);
            create_dir(&dir)?;
            let files = if let Some(source) = &volume.config_map {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                match api.get_opt(&source.name).await? {
                    Some(cm) => {
                        let mut files: BTreeMap<String, Vec<u8>> = cm
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        for (k, v) in cm.binary_data.unwrap_or_default() {
                            files.insert(k, v.0);
                        }
                        select(files, source.items.as_deref(), &source.name)?
                    }
                    None if source.optional == Some(true) => BTreeMap::new(),
                    None => return Err(ContainerError::missing("ConfigMap", &source.name)),
                }
            } else if let Some(source) = &volume.secret {
                let name = source.secret_name.clone().unwrap_or_default();
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                match api.get_opt(&name).await? {
                    Some(secret) => {
                        let files = secret
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, ByteString(v))| (k, v))
                            .collect();
                        select(files, source.items.as_deref(), &name)?
                    }
                    None if source.optional == Some(true) => BTreeMap::new(),
                    None => return Err(ContainerError::missing("Secret", &name)),
                }
            } else {
                BTreeMap::new()
            };
            let rewrite = volume.config_map.is_some();
            for (file, content) in files {
                let content = if rewrite && is_yaml(&file) {
                    self.rewritten_yaml(&content).unwrap_or(content)
                } else {
                    content
                };
                write_if_changed(&dir.join(file), &content)?;
            }
        }
        Ok(())
    }

    fn volume_dir(&self, volume: &Volume) -> PathBuf {
        self.root.join("volumes").join(&volume.name)
    }

    fn rewritten_yaml(&self, content: &[u8]) -> Option<Vec<u8>> {
        let mut value: Value = serde_yaml::from_slice(content).ok()?;
        if !value.is_mapping() {
            return None;
        }
        self.rewrite_yaml(&mut value);
        serde_yaml::to_string(&value).ok().map(String::into_bytes)
    }
}

/// The files of a ConfigMap or Secret volume: every key, or only `items` at their paths.
fn select(
    mut files: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    source: &str,
) -> Result<BTreeMap<String, Vec<u8>>, ContainerError> {
    let Some(items) = items else {
        return Ok(files);
    };
    let mut selected = BTreeMap::new();
    for item in items {
        let content = files.remove(&item.key).ok_or_else(|| {
            ContainerError::Unsupported(format!("{source} has no key {}", item.key))
        })?;
        selected.insert(item.path.clone(), content);
    }
    Ok(selected)
}

fn is_yaml(file: &str) -> bool {
    file.ends_with(".yaml") || file.ends_with(".yml")
}

fn create_dir(dir: &Path) -> Result<(), ContainerError> {
    std::fs::create_dir_all(dir).map_err(|source| ContainerError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_if_changed(path: &Path, content: &[u8]) -> Result<(), ContainerError> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    std::fs::write(path, content).map_err(|source| ContainerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> (PodSpec, Container) {
        let spec: PodSpec = serde_yaml::from_str(
            r#"
containers:
- name: llama-server
  args: [serve, --config, /etc/llama-server/server.yaml]
  volumeMounts:
  - {name: config, mountPath: /etc/llama-server, readOnly: true}
  - {name: keys, mountPath: /var/run/llama-server/keys}
  - {name: jwks, mountPath: /var/run/llama-server/jwks/}
  - {name: tmp, mountPath: /tmp}
volumes:
- {name: config, configMap: {name: chat-server}}
- {name: keys, secret: {secretName: chat-keys}}
- {name: jwks, configMap: {name: issuer}}
- {name: tmp, emptyDir: {}}
"#,
        )
        .expect("pod spec");
        let container = spec.containers[0].clone();
        (spec, container)
    }

    #[test]
    fn in_pod_paths_map_into_the_volume_directories() {
        let (spec, container) = pod();
        let mounts = Mounts::of(&spec, &container, Path::new("/r")).expect("mounts");
        assert_eq!(
            mounts.local("/etc/llama-server/server.yaml"),
            Some(PathBuf::from("/r/volumes/config/server.yaml"))
        );
        assert_eq!(
            mounts.local("/var/run/llama-server/keys"),
            Some(PathBuf::from("/r/volumes/keys"))
        );
        assert_eq!(
            mounts.local("/var/run/llama-server/jwks/jwks.json"),
            Some(PathBuf::from("/r/volumes/jwks/jwks.json"))
        );
        assert_eq!(mounts.local("/etc/llama-serverx"), None);
        assert_eq!(mounts.local("/models"), None);
        assert_eq!(mounts.rewrite("--out=/tmp/x"), "--out=/r/volumes/tmp/x");
        assert_eq!(mounts.rewrite("0.0.0.0:8080"), "0.0.0.0:8080");
    }

    #[test]
    fn server_yaml_paths_are_rewritten_and_nothing_else() {
        let (spec, container) = pod();
        let mounts = Mounts::of(&spec, &container, Path::new("/r")).expect("mounts");
        let text = "modelName: m\nmodelPath: demo\nauth:\n  keysDir: /var/run/llama-server/keys\n  token:\n    jwksFile: /var/run/llama-server/jwks/jwks.json\n";
        let out = mounts.rewritten_yaml(text.as_bytes()).expect("yaml");
        let value: Value = serde_yaml::from_slice(&out).expect("yaml");
        assert_eq!(value["auth"]["keysDir"], "/r/volumes/keys");
        assert_eq!(
            value["auth"]["token"]["jwksFile"],
            "/r/volumes/jwks/jwks.json"
        );
        assert_eq!(value["modelPath"], "demo");
        assert_eq!(value["modelName"], "m");
    }

    #[test]
    fn persistent_volumes_are_refused_with_the_volume_named() {
        let (mut spec, mut container) = pod();
        spec.volumes.get_or_insert_default().push(
            serde_yaml::from_str("{name: model, persistentVolumeClaim: {claimName: w}}")
                .expect("volume"),
        );
        container
            .volume_mounts
            .get_or_insert_default()
            .push(serde_yaml::from_str("{name: model, mountPath: /models}").expect("mount"));
        let err = Mounts::of(&spec, &container, Path::new("/r")).expect_err("refused");
        assert!(err.to_string().contains("volume model"), "{err}");
    }

    #[test]
    fn items_select_keys_at_their_paths() {
        let files = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        let items: Vec<KeyToPath> =
            serde_yaml::from_str("[{key: b, path: sub/b.txt}]").expect("items");
        let selected = select(files, Some(&items), "cm").expect("selected");
        assert_eq!(
            selected,
            BTreeMap::from([("sub/b.txt".to_owned(), b"2".to_vec())])
        );
    }
}
