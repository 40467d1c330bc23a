//! Two operator replicas: exactly one reconciles; killing it hands over within 30 s.

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use llama_operator::api::LlamaDeployment;
use std::path::Path;
use std::time::{Duration, Instant};
use testenv::{OperatorProcess, TestEnv, llama, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

async fn apply_and_wait_ready(env: &TestEnv, name: &str, secs: u64) -> anyhow::Result<()> {
    let spec = "  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  nodePool: {provider: kwok}\n";
    llama::apply(env, name, spec).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for(Duration::from_secs(secs), || async {
        let ld = api.get(name).await.ok()?;
        (llama::condition(&ld, "Ready")?.0 == "True").then_some(())
    })
    .await
}

#[tokio::test]
async fn one_replica_reconciles_and_a_dead_leader_is_replaced_within_30s() -> anyhow::Result<()> {
    let env = TestEnv::new("leader").await?;
    env.install_crds().await?;
    let args = [
        "--leader-elect",
        "--lease-namespace",
        env.namespace.as_str(),
    ];
    let first = OperatorProcess::start(&env, Path::new(OPERATOR), &args)?;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_for(Duration::from_secs(20), || async {
        leases.get_opt("llama-operator-leader").await.ok()?
    })
    .await?;
    let second = OperatorProcess::start(&env, Path::new(OPERATOR), &args)?;

    apply_and_wait_ready(&env, "one", 60).await?;
    let (a, b) = (first.log_text(), second.log_text());
    assert!(
        a.contains("became leader") && a.contains("reconciling"),
        "first replica:\n{a}"
    );
    assert!(b.contains("waiting for leadership"), "second replica:\n{b}");
    assert!(!b.contains("reconciling"), "the follower reconciled:\n{b}");
    let holder = leases
        .get("llama-operator-leader")
        .await?
        .spec
        .and_then(|s| s.holder_identity);

    // The leader dies without releasing anything.
    first.kill();
    let killed = Instant::now();
    wait_for(Duration::from_secs(30), || async {
        second.log_text().contains("became leader").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("no hand-over within 30 s: {e}\n{}", second.log_text()))?;
    let took = killed.elapsed();
    let new_holder = leases
        .get("llama-operator-leader")
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    assert_ne!(holder, new_holder);
    // And the new leader does the work.
    apply_and_wait_ready(&env, "two", 60).await?;
    eprintln!("leader fail-over took {:.1} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(30));
    Ok(())
}
