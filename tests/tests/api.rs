//! The LlamaDeployment and ComputeQuota APIs as the real API server serves them: schema,
//! defaults, CEL validation, printer columns, `kubectl explain`, and the scale subresource.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use llama_operator::api::{ComputeQuota, LlamaDeployment, SessionAffinity};
use testenv::{FIELD_MANAGER, TestEnv};

const VALID: &str = r#"
apiVersion: llama-operator.io/v1alpha1
kind: LlamaDeployment
metadata:
  name: chat
spec:
  model: Meta-Llama-3.1-8B-Instruct
  source:
    type: demo
  compute:
    instanceType: Standard_NC24ads_A100_v4
    instanceCount: 2
    minInstances: 1
    maxInstances: 4
  nodePool:
    provider: kwok
"#;

async fn env(name: &str) -> anyhow::Result<TestEnv> {
    let env = TestEnv::new(name).await?;
    env.install_crds().await?;
    Ok(env)
}

#[tokio::test]
async fn crds_install_and_become_established() -> anyhow::Result<()> {
    let env = TestEnv::new("crds").await?;
    let names = env.install_crds().await?;
    assert_eq!(
        names,
        vec![
            "computequotas.llama-operator.io",
            "llamadeployments.llama-operator.io"
        ]
    );
    // Short names and the category resolve through discovery.
    for args in [
        ["get", "llama"],
        ["get", "ld"],
        ["get", "cq"],
        ["get", "llama-operator"],
    ] {
        let out = env.run_kubectl(&args, None)?;
        assert!(out.success, "kubectl {args:?}: {}", out.stderr);
    }
    Ok(())
}

#[tokio::test]
async fn valid_deployment_is_accepted_with_defaults_and_printer_columns() -> anyhow::Result<()> {
    let env = env("valid").await?;
    let out = env.run_kubectl(&["apply", "-f", "-"], Some(VALID))?;
    assert!(out.success, "apply failed: {}", out.stderr);

    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let stored = api.get("chat").await?;
    // Defaults are applied by the API server from the schema.
    assert_eq!(stored.spec.rate_limits.tokens_per_minute, 200_000);
    assert_eq!(stored.spec.rate_limits.requests_per_minute, 1_000);
    assert!(!stored.spec.quota.use_shared_quota);
    assert!(!stored.spec.content_safety.enabled);
    assert_eq!(stored.spec.compute.instance_count, 2);
    // spec.engine is defaulted to the one field with a default; the rest stay unset, for the
    // operator and the server to decide.
    let engine = env.run_kubectl(
        &[
            "get",
            "llamadeployment",
            "chat",
            "-o",
            "jsonpath={.spec.engine}",
        ],
        None,
    )?;
    assert!(engine.success, "{}", engine.stderr);
    assert_eq!(engine.stdout.trim(), r#"{"kvCacheDtype":"auto"}"#);
    assert_eq!(stored.spec.endpoint.session_affinity, SessionAffinity::None);

    let out = env.run_kubectl(&["get", "llamadeployments"], None)?;
    assert!(out.success, "{}", out.stderr);
    let header: Vec<&str> = out
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MODEL",
            "INSTANCES",
            "READY",
            "QUOTA",
            "EXPIRES",
            "CORE-HOURS",
            "COST",
            "AGE"
        ]
    );
    let row: Vec<&str> = out
        .stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // INSTANCES is status.instances.desired (what runs after quota caps and autoscaling): empty,
    // like READY and the rest, until an operator reports; AGE is the third word.
    assert_eq!(row[..2], ["chat", "Meta-Llama-3.1-8B-Instruct"]);
    assert_eq!(row.len(), 3, "{row:?}");

    let wide = env.run_kubectl(&["get", "llamadeployments", "-o", "wide"], None)?;
    assert!(
        wide.stdout.contains("PHASE") && wide.stdout.contains("ENDPOINT"),
        "{}",
        wide.stdout
    );
    Ok(())
}

/// Each invalid manifest, and the words the API server's rejection must contain.
const INVALID: &[(&str, &str, &[&str])] = &[
    (
        "unknown model",
        "spec: {model: Llama-99B, source: {type: demo}}",
        &[
            "spec.model",
            "Unsupported value",
            "Meta-Llama-3.1-8B-Instruct",
        ],
    ),
    (
        "min greater than max",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, compute: {instanceCount: 3, minInstances: 5, maxInstances: 2}}",
        &[
            "spec.compute.minInstances",
            "less than or equal to spec.compute.maxInstances",
        ],
    ),
    (
        "negative count",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, compute: {instanceCount: -1}}",
        &["spec.compute.instanceCount", "greater than or equal to 0"],
    ),
    (
        "url source without url",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: url}}",
        &["spec.source.url", "required when spec.source.type is 'url'"],
    ),
    (
        "unknown provider",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, nodePool: {provider: gcp}}",
        &["spec.nodePool.provider", "Unsupported value", "kwok"],
    ),
    (
        "count above max",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, compute: {instanceCount: 7, minInstances: 1, maxInstances: 4}}",
        &[
            "spec.compute.instanceCount",
            "less than or equal to spec.compute.maxInstances",
        ],
    ),
    (
        "count below min",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, compute: {instanceCount: 1, minInstances: 2, maxInstances: 4}}",
        &[
            "spec.compute.instanceCount",
            "greater than or equal to spec.compute.minInstances",
        ],
    ),
    (
        "url that is not http",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: url, url: 'ftp://example.com/m.gguf'}}",
        &["spec.source.url", "should match"],
    ),
    (
        "pvc source without pvc",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: pvc}}",
        &["spec.source.pvc", "required when spec.source.type is 'pvc'"],
    ),
    (
        "url given for a demo source",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo, url: 'https://example.com/m.gguf'}}",
        &[
            "spec.source.url",
            "only allowed when spec.source.type is 'url'",
        ],
    ),
    (
        "token auth without issuer",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, auth: {mode: token}}",
        &["spec.auth.token", "required when spec.auth.mode is 'token'"],
    ),
    (
        "zero rate limit",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, rateLimits: {tokensPerMinute: 0}}",
        &[
            "spec.rateLimits.tokensPerMinute",
            "greater than or equal to 1",
        ],
    ),
    (
        "missing source",
        "spec: {model: Meta-Llama-3.2-1B}",
        &["spec.source", "Required value"],
    ),
    (
        "cache budget below the context window",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, engine: {contextLength: 8192, kvCacheTokens: 4096}}",
        &[
            "spec.engine.kvCacheTokens",
            "at least spec.engine.contextLength",
        ],
    ),
    (
        "unknown cache element type",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, engine: {kvCacheDtype: fp8}}",
        &["spec.engine.kvCacheDtype", "Unsupported value", "f16"],
    ),
    (
        "unknown session affinity",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, endpoint: {sessionAffinity: Sticky}}",
        &[
            "spec.endpoint.sessionAffinity",
            "Unsupported value",
            "ClientIP",
        ],
    ),
    (
        "zero batch size",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, engine: {maxBatchSize: 0}}",
        &["spec.engine.maxBatchSize", "greater than or equal to 1"],
    ),
    (
        "a weight type for safetensors weights",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: url, url: 'https://example.com/m.tar', quantization: Q4_K_M}}",
        &[
            "spec.source.quantization",
            "only allowed when spec.source.format is 'gguf'",
        ],
    ),
    (
        "unknown weight type",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: url, format: gguf, url: 'https://example.com/m.gguf', quantization: IQ4_XS}}",
        &["spec.source.quantization", "Unsupported value", "Q4_K_M"],
    ),
    (
        "one-token context window",
        "spec: {model: Meta-Llama-3.2-1B, source: {type: demo}, engine: {contextLength: 1}}",
        &["spec.engine.contextLength", "greater than or equal to 2"],
    ),
];

#[tokio::test]
async fn invalid_specs_are_rejected_with_a_message_naming_the_field() -> anyhow::Result<()> {
    let env = env("invalid").await?;
    let mut failures = Vec::new();
    for (case, spec, expected) in INVALID {
        let manifest = format!(
            "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: bad}}\n{spec}\n"
        );
        let out = env.run_kubectl(&["apply", "-f", "-"], Some(&manifest))?;
        if out.success {
            failures.push(format!("{case}: accepted, but must be rejected"));
            let _ = env.run_kubectl(&["delete", "llamadeployment", "bad"], None);
            continue;
        }
        for word in *expected {
            if !out.stderr.contains(word) {
                failures.push(format!(
                    "{case}: rejection lacks {word:?}: {}",
                    out.stderr.trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn names_that_cannot_name_a_service_are_rejected() -> anyhow::Result<()> {
    let env = env("names").await?;
    for name in [
        "9lives",
        "a-name-that-is-far-too-long-for-a-service-and-pool",
    ] {
        let manifest = format!(
            "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: {name}}}\nspec: {{model: Meta-Llama-3.2-1B, source: {{type: demo}}}}\n"
        );
        let out = env.run_kubectl(&["apply", "-f", "-"], Some(&manifest))?;
        assert!(!out.success, "{name} was accepted");
        assert!(
            out.stderr
                .contains("metadata.name must be a DNS-1035 label"),
            "{}",
            out.stderr
        );
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_tells_the_168_hour_rule() -> anyhow::Result<()> {
    let env = env("explain").await?;
    let out = env.run_kubectl(&["explain", "llamadeployment.spec.quota"], None)?;
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("useSharedQuota"), "{}", out.stdout);
    let flat = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("168 hours"), "{flat}");
    assert!(flat.contains("DELETED"), "{flat}");

    let top = env.run_kubectl(&["explain", "llamadeployment"], None)?;
    assert!(
        top.stdout.contains("Azure AI Model Inference API"),
        "{}",
        top.stdout
    );
    let quota = env.run_kubectl(&["explain", "computequota.spec.limits"], None)?;
    assert!(quota.stdout.contains("vCPU"), "{}", quota.stdout);
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_changes_instance_count_within_bounds() -> anyhow::Result<()> {
    let env = env("scale").await?;
    let out = env.run_kubectl(&["apply", "-f", "-"], Some(VALID))?;
    assert!(out.success, "{}", out.stderr);
    let out = env.run_kubectl(&["scale", "llamadeployment/chat", "--replicas=3"], None)?;
    assert!(out.success, "scale failed: {}", out.stderr);
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    assert_eq!(api.get("chat").await?.spec.compute.instance_count, 3);

    // The scale subresource is validated like the spec: 9 is above maxInstances.
    let out = env.run_kubectl(&["scale", "llamadeployment/chat", "--replicas=9"], None)?;
    assert!(!out.success, "scale beyond maxInstances was accepted");
    assert!(
        out.stderr.contains("spec.compute.instanceCount"),
        "{}",
        out.stderr
    );
    assert_eq!(api.get("chat").await?.spec.compute.instance_count, 3);
    Ok(())
}

#[tokio::test]
async fn status_is_a_subresource_and_server_side_apply_tracks_ownership() -> anyhow::Result<()> {
    let env = env("ssa").await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let desired: serde_json::Value = serde_yaml::from_str(VALID)?;
    api.patch(
        "chat",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&desired),
    )
    .await?;

    // Writing status through the main resource is ignored; through /status it sticks.
    let status = serde_json::json!({
        "apiVersion": "llama-operator.io/v1alpha1", "kind": "LlamaDeployment",
        "status": {"phase": "Pending", "observedGeneration": 1, "coreHours": 1.5}
    });
    api.patch(
        "chat",
        &PatchParams::apply("status-writer"),
        &Patch::Apply(&status),
    )
    .await?;
    assert_eq!(
        api.get("chat").await?.status,
        None,
        "status written through the main resource"
    );
    api.patch_status(
        "chat",
        &PatchParams::apply("status-writer"),
        &Patch::Apply(&status),
    )
    .await?;
    let got = api.get("chat").await?;
    assert_eq!(got.status.as_ref().and_then(|s| s.core_hours), Some(1.5));

    // A second manager changing a field we own conflicts unless forced.
    let other = serde_json::json!({
        "apiVersion": "llama-operator.io/v1alpha1", "kind": "LlamaDeployment",
        "spec": {"compute": {"instanceCount": 4}}
    });
    let conflict = api
        .patch(
            "chat",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&other),
        )
        .await;
    assert!(
        matches!(&conflict, Err(kube::Error::Api(e)) if e.code == 409),
        "expected a 409 conflict, got {conflict:?}"
    );
    Ok(())
}

#[tokio::test]
async fn compute_quota_is_served_with_its_schema() -> anyhow::Result<()> {
    let env = env("quota").await?;
    let api: Api<ComputeQuota> = Api::namespaced(env.client.clone(), &env.namespace);
    let quota: serde_json::Value = serde_yaml::from_str(
        "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: default}\nspec:\n  limits:\n  - {family: StandardNCADSA100v4Family, cores: 96}\n  gpus: 8\n",
    )?;
    api.patch(
        "default",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&quota),
    )
    .await?;
    let got = api.get("default").await?;
    assert_eq!(got.spec.limits[0].cores, 96);

    // Family names are unique (a list-map keyed by family): a duplicate is rejected.
    let dup = "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: dup}\nspec:\n  limits:\n  - {family: A, cores: 1}\n  - {family: A, cores: 2}\n";
    let out = env.run_kubectl(&["apply", "-f", "-"], Some(dup))?;
    assert!(
        !out.success && out.stderr.contains("spec.limits[1]"),
        "{}",
        out.stderr
    );
    let neg = "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {name: neg}\nspec:\n  limits:\n  - {family: A, cores: -4}\n";
    let out = env.run_kubectl(&["apply", "-f", "-"], Some(neg))?;
    assert!(
        !out.success && out.stderr.contains("spec.limits[0].cores"),
        "{}",
        out.stderr
    );

    // The dynamic API sees the same object (what GitOps tools use).
    let gvk = GroupVersionKind::gvk("llama-operator.io", "v1alpha1", "ComputeQuota");
    let dynamic: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &ApiResource::from_gvk(&gvk),
    );
    assert_eq!(dynamic.get("default").await?.data["spec"]["gpus"], 8);
    Ok(())
}
