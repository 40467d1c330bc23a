//! The ConfigMap with llama-server's configuration for one deployment.

use super::{BuildError, child_metadata, from_json, name_of};
use crate::api::{LlamaDeployment, SourceType, WeightType};
use crate::validate::Plan;
use crate::weights::WeightsFrom;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;

/// Where the configuration is mounted in the server container.
pub const SERVER_CONFIG_PATH: &str = "/etc/llama-server/server.yaml";
/// Where the model is mounted (or downloaded to).
pub const MODEL_DIR: &str = "/models";
/// Where the key files are mounted.
pub const KEYS_DIR: &str = "/var/run/llama-server/keys";
/// Where the token issuer's signing keys (the `jwksConfigMapRef` ConfigMap) are mounted.
pub const JWKS_DIR: &str = "/var/run/llama-server/jwks";

/// The server configuration: what to serve and the endpoint's policies.
pub fn server_config_map(ld: &LlamaDeployment, plan: &Plan) -> Result<ConfigMap, BuildError> {
    let (name, _) = name_of(ld)?;
    let spec = &ld.spec;
    let model_path = match (&spec.source.type_, &spec.source.pvc) {
        (SourceType::Demo, _) => "demo".to_owned(),
        (SourceType::Pvc, Some(pvc)) => match pvc.path.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{MODEL_DIR}/{p}"),
            _ => MODEL_DIR.to_owned(),
        },
        // `llama-server fetch` downloads into MODEL_DIR: the Hugging Face layout, or (a `.gguf`
        // URL, a GGUF-only repository) one `.gguf` file that the server finds there with
        // `format: gguf`, taking the tokenizer from the file's metadata, or from the image's
        // LLAMA_SERVER_TOKENIZER_DIR, when none lies beside it.
        _ => MODEL_DIR.to_owned(),
    };
    let mut config = json!({
        "modelName": spec.model.to_string(),
        "modelPath": model_path,
        "format": spec.source.format,
        "contextLength": plan.serving.context_length,
        "auth": {
            "mode": spec.auth.mode,
            "keysDir": KEYS_DIR,
            "token": spec.auth.token.as_ref().map(|t| json!({
                "issuer": t.issuer,
                "audience": t.audience,
                "jwksFile": format!("{JWKS_DIR}/jwks.json"),
            })),
        },
        "rateLimits": spec.rate_limits,
        "contentSafety": spec.content_safety,
        "engine": engine_config(ld, plan),
    });
    if let Some(fields) = config.as_object_mut() {
        if let Some(weight_type) = checked_weight_type(plan) {
            fields.insert("weightType".into(), json!(weight_type.name()));
        }
        // The server splits the model's layers over the instance's GPUs. One GPU is its
        // default, left unwritten, so that a server image pinned to an earlier version (which
        // knows no `gpus`) still reads the file.
        if plan.instance.gpu_count > 1 {
            fields.insert("gpus".into(), json!(plan.instance.gpu_count));
        }
    }
    let text = serde_yaml::to_string(&config).map_err(|e| BuildError::Serde {
        kind: "ConfigMap",
        source: serde_json::Error::io(std::io::Error::other(e)),
    })?;
    from_json(
        "ConfigMap",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": child_metadata(ld, &format!("{name}-server"))?,
            "data": {"server.yaml": text},
        }),
    )
}

/// The quantized weight type the GPU memory was sized for, when the spec names it (the field or
/// the file name): the server refuses a file of another type, which would not fit the plan. A
/// 16-bit or assumed type is not checked.
fn checked_weight_type(plan: &Plan) -> Option<WeightType> {
    let weights = plan.weights;
    let named = matches!(
        weights.from,
        WeightsFrom::Quantization | WeightsFrom::Url | WeightsFrom::PvcPath
    );
    (named && !weights.weight_type.is_16_bit()).then_some(weights.weight_type)
}

/// The server's `engine` section: the planned budget and the limits the spec sets; the server's
/// own defaults stand for the rest.
fn engine_config(ld: &LlamaDeployment, plan: &Plan) -> serde_json::Value {
    let engine = &ld.spec.engine;
    let mut out = serde_json::Map::new();
    out.insert("kvCacheDtype".into(), json!(engine.kv_cache_dtype));
    let mut put = |key: &str, value: Option<serde_json::Value>| {
        if let Some(value) = value {
            out.insert(key.into(), value);
        }
    };
    put(
        "kvCacheTokens",
        plan.serving.kv_cache_tokens.map(|t| json!(t)),
    );
    put("maxBatchSize", engine.max_batch_size.map(|n| json!(n)));
    put("maxQueue", engine.max_queue.map(|n| json!(n)));
    put(
        "prefillChunkTokens",
        engine.prefill_chunk_tokens.map(|n| json!(n)),
    );
    put("prefixCache", engine.prefix_cache.map(|on| json!(on)));
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    #[test]
    fn config_carries_model_limits_and_auth() {
        let d = ld(CHAT);
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-server"));
        let text = &cm.data.expect("data")["server.yaml"];
        let cfg: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        assert_eq!(cfg["modelName"], "Meta-Llama-3.1-8B-Instruct");
        assert_eq!(cfg["modelPath"], "demo");
        assert_eq!(cfg["gpus"], 2, "the GPUs of Standard_NC48ads_A100_v4");
        let one = ld(&CHAT.replace("Standard_NC48ads_A100_v4", "Standard_NC24ads_A100_v4"));
        let cm = server_config_map(&one, &plan(&one)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        assert!(cfg.get("gpus").is_none(), "one GPU is the server's default");
        assert_eq!(cfg["rateLimits"]["tokensPerMinute"], 200000);
        assert_eq!(cfg["auth"]["mode"], "key");
        assert_eq!(cfg["auth"]["keysDir"], KEYS_DIR);
    }

    #[test]
    fn rate_limits_are_per_instance_and_scaling_leaves_the_config_alone() {
        let text = |count: i32| {
            let d = ld(&format!(
                "{}  rateLimits: {{tokensPerMinute: 9000, requestsPerMinute: 30}}\n",
                CHAT.replace("instanceCount: 2", &format!("instanceCount: {count}"))
            ));
            assert_eq!(d.spec.compute.instance_count, count);
            server_config_map(&d, &plan(&d))
                .expect("configmap")
                .data
                .expect("data")["server.yaml"]
                .clone()
        };
        let cfg: serde_yaml::Value = serde_yaml::from_str(&text(3)).expect("yaml");
        // Each instance enforces the spec's numbers as they are (the CRD says per instance).
        assert_eq!(cfg["rateLimits"]["tokensPerMinute"], 9000);
        assert_eq!(cfg["rateLimits"]["requestsPerMinute"], 30);
        // The configuration (hashed into the pod template) does not depend on the count, so
        // scaling never restarts the running instances.
        assert_eq!(text(1), text(7));
    }

    #[test]
    fn engine_settings_reach_the_servers_engine_section() {
        let config = |extra: &str| -> serde_yaml::Value {
            let d = ld(&format!("{CHAT}{extra}"));
            let cm = server_config_map(&d, &plan(&d)).expect("configmap");
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml")
        };
        // Unset: the planned budget (four windows of the 8B on two A100s fit) and `auto`, and
        // nothing else, so the server's defaults stand.
        let cfg = config("");
        assert_eq!(cfg["contextLength"], 131_072);
        let engine = cfg["engine"].as_mapping().expect("engine section");
        assert_eq!(engine.len(), 2, "{engine:?}");
        assert_eq!(cfg["engine"]["kvCacheTokens"], 4 * 131_072);
        assert_eq!(cfg["engine"]["kvCacheDtype"], "auto");

        let cfg = config(
            "  engine: {contextLength: 8192, kvCacheTokens: 20000, kvCacheDtype: f32, \
             maxBatchSize: 8, maxQueue: 0, prefillChunkTokens: 256, prefixCache: false}\n",
        );
        assert_eq!(cfg["contextLength"], 8192);
        let engine = &cfg["engine"];
        assert_eq!(engine["kvCacheTokens"], 20_000);
        assert_eq!(engine["kvCacheDtype"], "f32");
        assert_eq!(engine["maxBatchSize"], 8);
        assert_eq!(engine["maxQueue"], 0);
        assert_eq!(engine["prefillChunkTokens"], 256);
        assert_eq!(engine["prefixCache"], false);
    }

    #[test]
    fn pvc_path_is_under_the_model_dir() {
        let d = ld(&CHAT.replace(
            "{type: demo}",
            "{type: pvc, pvc: {claimName: w, path: /llama/8b/}}",
        ));
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        assert_eq!(cfg["modelPath"], "/models/llama/8b");
    }

    #[test]
    fn a_gguf_url_points_the_server_at_the_download_directory_as_gguf() {
        let d = ld(&CHAT.replace(
            "{type: demo}",
            "{type: url, url: 'https://models.example/Llama-3.1-8B-Q4_K_M.gguf', format: gguf}",
        ));
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        // The server takes the directory's one .gguf file (what `fetch --out /models` wrote) and
        // the image's tokenizer directory, so the configuration names neither.
        assert_eq!(cfg["modelPath"], MODEL_DIR);
        assert_eq!(cfg["format"], "gguf");
        assert!(cfg.get("tokenizerDir").is_none(), "{cfg:?}");
        // The type the file name names, which sized the plan, is checked against the file.
        assert_eq!(cfg["weightType"], "Q4_K_M");

        let d = ld(&CHAT.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: bartowski/Llama-3.1-8B-GGUF}, \
             format: gguf}",
        ));
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        assert_eq!(cfg["modelPath"], MODEL_DIR);
        assert_eq!(cfg["format"], "gguf");
        // Nothing names this repository's type: sized as 16-bit, and nothing to check.
        assert!(cfg.get("weightType").is_none(), "{cfg:?}");
        let d = ld(&CHAT.replace(
            "{type: demo}",
            "{type: huggingFace, huggingFace: {repository: bartowski/Llama-3.1-8B-GGUF}, \
             format: gguf, quantization: Q6_K}",
        ));
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        assert_eq!(cfg["weightType"], "Q6_K");
    }

    #[test]
    fn token_auth_tells_the_server_where_the_signing_keys_are() {
        let d = ld(&format!(
            "{CHAT}  auth: {{mode: token, token: {{issuer: 'https://login.example/t/v2.0', \
             audience: 'api://llama', jwksConfigMapRef: {{name: issuer-keys}}}}}}\n"
        ));
        let cm = server_config_map(&d, &plan(&d)).expect("configmap");
        let cfg: serde_yaml::Value =
            serde_yaml::from_str(&cm.data.expect("data")["server.yaml"]).expect("yaml");
        assert_eq!(cfg["auth"]["token"]["audience"], "api://llama");
        assert_eq!(
            cfg["auth"]["token"]["jwksFile"],
            format!("{JWKS_DIR}/jwks.json")
        );
    }
}
