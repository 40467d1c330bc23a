//! The Deployment of llama-server: one replica per instance, pinned to the deployment's pool.

use super::config_map::{JWKS_DIR, KEYS_DIR, MODEL_DIR, SERVER_CONFIG_PATH};
use super::{
    BuildError, POOL_LABEL, POOL_TAINT, child_metadata, from_json, generated_secret_name, name_of,
    pod_labels, selector_labels,
};
use crate::api::{LlamaDeployment, NodePoolProvider, SourceType};
use crate::config::OperatorConfig;
use crate::validate::Plan;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::{Value, json};

/// The key of `spec.source.huggingFace.tokenSecretRef` when `key` is not set.
pub const HF_TOKEN_DEFAULT_KEY: &str = "token";

const PORT: i32 = 8080;

/// The server Deployment. `config_hash` rolls the pods when the server configuration changes;
/// key changes do not restart anything (servers re-read the mounted key files).
pub fn server_deployment(
    ld: &LlamaDeployment,
    plan: &Plan,
    config: &OperatorConfig,
    pool: &str,
    config_hash: &str,
) -> Result<Deployment, BuildError> {
    let (name, _) = name_of(ld)?;
    let spec = &ld.spec;
    let it = &plan.instance;

    // spec.nodePool.nodeSelector: labels existing nodes must have, or that provisioned nodes
    // carry; either way the pods select them too.
    let mut node_selector = serde_json::Map::new();
    for (k, v) in &spec.node_pool.node_selector {
        node_selector.insert(k.clone(), json!(v));
    }
    match plan.provider {
        NodePoolProvider::Existing => {
            node_selector.insert("node.kubernetes.io/instance-type".into(), json!(it.name));
        }
        NodePoolProvider::Kwok | NodePoolProvider::Karpenter => {
            node_selector.insert(POOL_LABEL.into(), json!(pool));
        }
    }

    let keys_secret = spec
        .auth
        .secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| generated_secret_name(&name));
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": format!("{name}-server")}}),
        json!({"name": "keys", "secret": {"secretName": keys_secret, "defaultMode": 0o440}}),
        json!({"name": "tmp", "emptyDir": {}}),
    ];
    let mut mounts = vec![
        json!({"name": "config", "mountPath": "/etc/llama-server", "readOnly": true}),
        json!({"name": "keys", "mountPath": KEYS_DIR, "readOnly": true}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    if let Some(jwks) = spec
        .auth
        .token
        .as_ref()
        .and_then(|t| t.jwks_config_map_ref.as_ref())
    {
        volumes.push(json!({"name": "jwks", "configMap": {"name": jwks.name}}));
        mounts.push(json!({"name": "jwks", "mountPath": JWKS_DIR, "readOnly": true}));
    }
    let mut init_containers = Vec::new();
    match spec.source.type_ {
        SourceType::Demo => {}
        SourceType::Pvc => {
            if let Some(pvc) = &spec.source.pvc {
                volumes.push(json!({"name": "model", "persistentVolumeClaim": {"claimName": pvc.claim_name, "readOnly": true}}));
                mounts.push(json!({"name": "model", "mountPath": MODEL_DIR, "readOnly": true}));
            }
        }
        SourceType::Url | SourceType::HuggingFace => {
            volumes.push(json!({"name": "model", "emptyDir": {}}));
            mounts.push(json!({"name": "model", "mountPath": MODEL_DIR, "readOnly": true}));
            init_containers.push(fetch_container(ld, &config.fetch_image)?);
        }
    }

    let security = container_security();
    let gpus = it.gpu_count.to_string();
    let server = json!({
        "name": SERVER_CONTAINER,
        "image": config.server_image,
        "args": ["serve", "--config", SERVER_CONFIG_PATH, "--listen", format!("0.0.0.0:{PORT}"),
                 "--drain-seconds", config.drain_seconds.to_string()],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": (it.cores / 2).max(1).to_string(), "memory": format!("{}Gi", (it.memory_gib / 2).max(1)), "nvidia.com/gpu": gpus},
            "limits": {"nvidia.com/gpu": gpus},
        },
        "startupProbe": {"httpGet": {"path": "/health/live", "port": "http"}, "periodSeconds": 5, "failureThreshold": 120},
        "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "volumeMounts": mounts,
        "securityContext": security,
        // `serve` writes why it stopped to /dev/termination-log; a crash that wrote nothing
        // (killed for memory, a signal) leaves the log's last lines there instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });

    let mut labels = pod_labels(ld, &name);
    labels.insert(POOL_LABEL.into(), pool.into());
    from_json(
        "Deployment",
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": child_metadata(ld, &name)?,
            "spec": {
                "replicas": plan.instances,
                "selector": {"matchLabels": selector_labels(&name)},
                // One instance is one GPU node: no surge node exists to roll onto.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {"llama-operator.io/config-hash": config_hash},
                    },
                    "spec": {
                        "nodeSelector": node_selector,
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": POOL_TAINT, "operator": "Equal", "value": pool, "effect": "NoSchedule"},
                        ],
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": config.drain_seconds + 30,
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "initContainers": init_containers,
                        "containers": [server],
                        "volumes": volumes,
                    },
                },
            },
        }),
    )
}

fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// Name of the init container that downloads the weights; its exit code and termination message
/// tell the operator whether the download failed.
pub const FETCH_CONTAINER: &str = "fetch-model";
/// The server container's name.
pub const SERVER_CONTAINER: &str = "llama-server";

/// The init container that downloads URL or Hugging Face weights into the model volume.
fn fetch_container(ld: &LlamaDeployment, image: &str) -> Result<Value, BuildError> {
    let source = &ld.spec.source;
    let mut args = vec!["fetch".to_owned(), "--out".to_owned(), MODEL_DIR.to_owned()];
    let mut env = Vec::new();
    match source.type_ {
        SourceType::Url => {
            args.extend(["--url".to_owned(), source.url.clone().unwrap_or_default()]);
            if let Some(sha) = &source.sha256 {
                args.extend(["--sha256".to_owned(), sha.clone()]);
            }
        }
        _ => {
            if let Some(hf) = &source.hugging_face {
                args.extend(["--hugging-face".to_owned(), hf.repository.clone()]);
                args.extend([
                    "--revision".to_owned(),
                    hf.revision.clone().unwrap_or_else(|| "main".into()),
                ]);
                if let Some(quantization) = source.quantization {
                    args.extend(["--gguf-type".to_owned(), quantization.name().to_owned()]);
                }
                if let Some(token) = &hf.token_secret_ref {
                    env.push(json!({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                        "name": token.name, "key": token.key.clone().unwrap_or_else(|| HF_TOKEN_DEFAULT_KEY.into())}}}));
                }
            }
        }
    }
    Ok(json!({
        "name": FETCH_CONTAINER,
        "image": image,
        "args": args,
        "env": env,
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    fn build(yaml: &str) -> serde_yaml::Value {
        let d = ld(yaml);
        let dep = server_deployment(
            &d,
            &plan(&d),
            &OperatorConfig::default(),
            "chat-0123456789",
            "h1",
        )
        .expect("deployment");
        serde_yaml::to_value(&dep).expect("yaml")
    }

    #[test]
    fn kwok_pool_pins_pods_to_the_pool_with_gpus_probes_and_non_root() {
        let y = build(CHAT);
        assert_eq!(y["spec"]["replicas"], 2);
        let pod = &y["spec"]["template"]["spec"];
        assert_eq!(
            pod["nodeSelector"],
            serde_yaml::from_str::<serde_yaml::Value>(
                "{llama-operator.io/pool: chat-0123456789, team: a}"
            )
            .expect("yaml")
        );
        assert_eq!(pod["tolerations"][1]["value"], "chat-0123456789");
        let c = &pod["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/ready");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health/live");
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        // Why the server stopped reaches the pod's status, and so ModelLoaded.
        assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["terminationGracePeriodSeconds"], 330);
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "chat-keys");
        assert!(
            pod["initContainers"]
                .as_sequence()
                .is_none_or(|s| s.is_empty())
        );
    }

    #[test]
    fn existing_nodes_are_selected_by_labels_and_instance_type() {
        let y = build(&CHAT.replace("provider: kwok", "provider: existing"));
        let sel = &y["spec"]["template"]["spec"]["nodeSelector"];
        assert_eq!(sel["team"], "a");
        assert_eq!(
            sel["node.kubernetes.io/instance-type"],
            "Standard_NC48ads_A100_v4"
        );
        assert!(sel.get("llama-operator.io/pool").is_none());
    }

    #[test]
    fn url_source_downloads_in_an_init_container() {
        let y = build(&CHAT.replace(
            "{type: demo}",
            "{type: url, url: 'https://x.example/m.gguf', sha256: abc, format: gguf}",
        ));
        let init = &y["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(init["name"], "fetch-model");
        // The download runs the CPU build (no GPU request, so no driver library); the server
        // the CUDA build.
        let config = OperatorConfig::default();
        assert_eq!(init["image"].as_str(), Some(config.fetch_image.as_str()));
        assert_eq!(
            y["spec"]["template"]["spec"]["containers"][0]["image"].as_str(),
            Some(config.server_image.as_str())
        );
        assert!(config.server_image.contains("llama-server-cuda:"));
        assert!(!config.fetch_image.contains("cuda"));
        let args: Vec<String> = serde_yaml::from_value(init["args"].clone()).expect("args");
        assert_eq!(
            args,
            [
                "fetch",
                "--out",
                "/models",
                "--url",
                "https://x.example/m.gguf",
                "--sha256",
                "abc"
            ]
        );
    }

    #[test]
    fn hugging_face_token_comes_from_the_secret() {
        let y = build(&CHAT.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.1-8B-Instruct, tokenSecretRef: {name: hf}}}",
        ));
        let env = &y["spec"]["template"]["spec"]["initContainers"][0]["env"][0];
        assert_eq!(env["name"], "HF_TOKEN");
        assert_eq!(env["valueFrom"]["secretKeyRef"]["name"], "hf");
        assert_eq!(env["valueFrom"]["secretKeyRef"]["key"], "token");
    }

    #[test]
    fn a_gguf_repository_is_fetched_for_the_named_type() {
        let args = |source: &str| {
            let y = build(&CHAT.replace("{type: demo}", source));
            y["spec"]["template"]["spec"]["initContainers"][0]["args"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        };
        let typed = args(
            "{type: huggingFace, format: gguf, quantization: Q4_K_M, huggingFace: {repository: bartowski/Llama-3.2-1B-Instruct-GGUF}}",
        );
        assert!(
            typed.ends_with(&["--gguf-type".to_owned(), "Q4_K_M".to_owned()]),
            "{typed:?}"
        );
        let untyped = args(
            "{type: huggingFace, format: gguf, huggingFace: {repository: bartowski/Llama-3.2-1B-Instruct-GGUF}}",
        );
        assert!(!untyped.contains(&"--gguf-type".to_owned()), "{untyped:?}");
    }

    #[test]
    fn pvc_source_mounts_the_claim_read_only() {
        let y = build(&CHAT.replace("{type: demo}", "{type: pvc, pvc: {claimName: weights}}"));
        let vols = y["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        let model = vols
            .iter()
            .find(|v| v["name"] == "model")
            .expect("model volume");
        assert_eq!(model["persistentVolumeClaim"]["claimName"], "weights");
        assert_eq!(model["persistentVolumeClaim"]["readOnly"], true);
    }

    #[test]
    fn token_auth_mounts_the_issuers_signing_keys() {
        let y = build(&format!(
            "{CHAT}  auth: {{mode: token, token: {{issuer: 'https://login.example/t/v2.0', \
             audience: 'api://llama', jwksConfigMapRef: {{name: issuer-keys}}}}}}\n"
        ));
        let pod = &y["spec"]["template"]["spec"];
        let volumes: Vec<serde_yaml::Value> =
            serde_yaml::from_value(pod["volumes"].clone()).expect("volumes");
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == "jwks" && v["configMap"]["name"] == "issuer-keys")
        );
        let mounts = &pod["containers"][0]["volumeMounts"];
        let mounts: Vec<serde_yaml::Value> =
            serde_yaml::from_value(mounts.clone()).expect("mounts");
        assert!(mounts.iter().any(|m| m["mountPath"] == JWKS_DIR));
    }
}
