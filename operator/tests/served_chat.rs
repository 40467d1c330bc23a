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
        "  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 1}\n  nodePool: {provider: kwok}\n  rateLimits: {requestsPerMinute: 7}\n",
    )
    .await?;
    wait_ready(&env, &op, "chat", 90).await?;
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
