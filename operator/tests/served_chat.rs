//! From `kubectl apply` to a served token: the operator's ConfigMap and keys Secret, given
//! unchanged (paths aside) to a real `llama-server`, answer a chat completion with the
//! deployment's key — the configuration contract between the two binaries, end to end.

use std::path::Path;

use testenv::llama::{apply, wait_ready};
use testenv::local_server::{server_binary, start_for};
use testenv::{OperatorProcess, TestEnv};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

#[tokio::test]
async fn a_ready_deployment_answers_a_chat_completion() -> anyhow::Result<()> {
    let env = TestEnv::new("served").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    apply(
        &env,
        "chat",
        "  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1}\n  nodePool: {provider: kwok}\n  rateLimits: {requestsPerMinute: 7}\n  engine: {kvCacheTokens: 3000, kvCacheDtype: f16, maxBatchSize: 3}\n",
    )
    .await?;
    let ld = wait_ready(&env, &op, "chat", 90).await?;
    // The operator reports what it configured: the budget caps the 1B's 131072-token window.
    let engine = ld
        .status
        .as_ref()
        .and_then(|s| s.engine.clone())
        .ok_or_else(|| anyhow::anyhow!("no status.engine: {:?}", ld.status))?;
    assert_eq!(engine.kv_cache_tokens, Some(3000));
    assert_eq!(engine.context_length, 3000);
    // 3000 tokens × 32 KiB (the 1B's 16 layers × 8 heads × 64 × 2 × 2 bytes) = 0.09 GiB.
    assert_eq!(engine.kv_cache_gib, Some(0.09));
    let workdir = tempfile::tempdir()?;
    let server = start_for(
        &env.client,
        &env.namespace,
        "chat",
        &server_binary()?,
        workdir.path(),
    )
    .await?;
    let answer = server.chat("Hello!", 5).await?;
    assert_eq!(answer["model"], "Meta-Llama-3.2-1B-Instruct");
    assert_eq!(answer["object"], "chat.completion");
    let usage = &answer["usage"];
    assert!(
        usage["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=5).contains(&n))
    );
    // The deployment's own rate limit reached the server.
    let limited = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.endpoint))
        .header("api-key", &server.key)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}))
        .send()
        .await?;
    assert_eq!(
        limited.headers()["x-ratelimit-remaining-requests"],
        "5",
        "rateLimits.requestsPerMinute: 7 from the spec"
    );
    // The deployment's engine settings reached the server: its budget, and the f16 cache of the
    // demo model (2 layers × 2 key/value heads × 16 dimensions, keys and values, 2 bytes each:
    // 256 bytes a token, where its f32 weights would give f32's 512 by default).
    let metrics = reqwest::get(format!("{}/metrics", server.endpoint))
        .await?
        .text()
        .await?;
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::trim))
            .map(str::to_owned)
    };
    assert_eq!(
        gauge("llama_server_kv_cache_budget_tokens").as_deref(),
        Some("3000"),
        "{metrics}"
    );
    assert_eq!(
        gauge("llama_server_kv_cache_token_bytes").as_deref(),
        Some("256"),
        "{metrics}"
    );
    // And a wrong key is refused.
    let refused = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.endpoint))
        .header("api-key", "0".repeat(32))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await?;
    assert_eq!(refused.status(), 401);
    Ok(())
}
