//! Quota on the real control plane: dedicated, exceeded, shared with expiry, concurrency,
//! scale capping, and core-hour accrual that survives restarts and deletion.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use llama_operator::api::{ComputeQuota, LlamaDeployment, QuotaSource};
use std::path::Path;
use std::time::{Duration, Instant};
use testenv::llama::{condition as cond, scrape};
use testenv::{FIELD_MANAGER, OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");
const FAMILY: &str = "StandardNCADSA100v4Family";

struct Setup {
    env: TestEnv,
    config: std::path::PathBuf,
}

async fn setup(name: &str, config: &str) -> anyhow::Result<(Setup, OperatorProcess)> {
    let env = TestEnv::new(name).await?;
    env.install_crds().await?;
    let path = env
        .plane
        .dir
        .join(format!("{}-operator.yaml", env.namespace));
    std::fs::write(&path, config)?;
    let op = start(&env, &path)?;
    Ok((Setup { env, config: path }, op))
}

fn start(env: &TestEnv, config: &Path) -> anyhow::Result<OperatorProcess> {
    let c = config.to_string_lossy().into_owned();
    OperatorProcess::start(env, Path::new(OPERATOR), &["--config", &c])
}

async fn quota(env: &TestEnv, cores: i64) -> anyhow::Result<()> {
    let api: Api<ComputeQuota> = Api::namespaced(env.client.clone(), &env.namespace);
    let body: serde_json::Value = serde_yaml::from_str(&format!(
        "apiVersion: llama-operator.io/v1alpha1\nkind: ComputeQuota\nmetadata: {{name: default}}\nspec: {{limits: [{{family: {FAMILY}, cores: {cores}}}]}}\n"
    ))?;
    api.patch(
        "default",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn deploy(env: &TestEnv, name: &str, count: i32, shared: bool) -> anyhow::Result<()> {
    let spec = format!(
        "  model: Meta-Llama-3.2-1B-Instruct\n  source: {{type: demo}}\n  compute: {{instanceType: Standard_NC24ads_A100_v4, instanceCount: {count}}}\n  quota: {{useSharedQuota: {shared}}}\n  nodePool: {{provider: kwok}}\n"
    );
    testenv::llama::apply(env, name, &spec).await
}

#[tokio::test]
async fn dedicated_fits_and_a_short_quota_says_exactly_what_is_missing() -> anyhow::Result<()> {
    let (s, op) = setup("quota-basic", "").await?;
    let env = &s.env;
    quota(env, 96).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    // 1 instance of 24 cores holds ceil(1.2) × 24 = 48 cores.
    deploy(env, "fits", 1, false).await?;
    let ld = wait_for(Duration::from_secs(60), || async {
        let ld = api.get("fits").await.ok()?;
        (cond(&ld, "Ready")?.0 == "True").then_some(ld)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;
    let st = ld.status.clone().unwrap_or_default();
    assert_eq!(
        (st.quota_source, st.reserved_cores),
        (Some(QuotaSource::Dedicated), Some(48))
    );
    assert!(st.expires_at.is_none());

    // 2 more instances need ceil(2.4) × 24 = 72; only 48 are left.
    deploy(env, "short", 2, false).await?;
    let (status, reason, message) = wait_for(Duration::from_secs(30), || async {
        cond(&api.get("short").await.ok()?, "QuotaExceeded").filter(|c| c.0 == "True")
    })
    .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "InsufficientQuota")
    );
    for words in [
        FAMILY,
        "needs 72 vCPU cores",
        "48 available",
        "spec.quota.useSharedQuota",
        "168 hours",
    ] {
        assert!(message.contains(words), "{words:?} missing: {message}");
    }
    let short = api.get("short").await?;
    assert_eq!(
        cond(&short, "Ready").map(|c| c.1),
        Some("QuotaExceeded".into())
    );
    let sel = format!(
        "llama-operator.io/deployment=short,llama-operator.io/deployment-namespace={}",
        env.namespace
    );
    assert!(
        Api::<Node>::all(env.client.clone())
            .list(&ListParams::default().labels(&sel))
            .await?
            .items
            .is_empty()
    );

    // The ComputeQuota shows who holds what.
    let cq = Api::<ComputeQuota>::namespaced(env.client.clone(), &env.namespace)
        .get("default")
        .await?;
    let fam = cq
        .status
        .unwrap_or_default()
        .families
        .into_iter()
        .next()
        .unwrap_or_default();
    assert_eq!((fam.limit, fam.used, fam.available), (96, 48, 48));
    assert_eq!(
        fam.holders
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>(),
        ["fits"]
    );

    // Freeing quota (deleting "fits") admits the waiting deployment without touching it.
    api.delete("fits", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), || async {
        (cond(&api.get("short").await.ok()?, "Ready")?.0 == "True").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("not re-admitted: {e}\n{}", op.log_text()))?;
    Ok(())
}

#[tokio::test]
async fn twenty_concurrent_applies_admit_exactly_five() -> anyhow::Result<()> {
    let (s, op) = setup("quota-race", "").await?;
    let env = &s.env;
    quota(env, 240).await?; // 5 × 48
    let applies = (0..20).map(|i| {
        deploy(
            env,
            Box::leak(format!("r{i:02}").into_boxed_str()),
            1,
            false,
        )
    });
    for r in futures::future::join_all(applies).await {
        r?;
    }
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let (admitted, waiting) = wait_for(Duration::from_secs(90), || async {
        let all = api.list(&ListParams::default()).await.ok()?.items;
        let admitted = all
            .iter()
            .filter(|l| l.status.as_ref().and_then(|s| s.quota_source).is_some())
            .count();
        let waiting = all
            .iter()
            .filter(|l| cond(l, "QuotaExceeded").is_some_and(|c| c.0 == "True"))
            .count();
        (admitted + waiting == 20).then_some((admitted, waiting))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;
    assert_eq!((admitted, waiting), (5, 15));
    let cq = Api::<ComputeQuota>::namespaced(env.client.clone(), &env.namespace)
        .get("default")
        .await?;
    let fam = cq
        .status
        .unwrap_or_default()
        .families
        .into_iter()
        .next()
        .unwrap_or_default();
    assert_eq!(fam.used, 240);
    Ok(())
}

#[tokio::test]
async fn scaling_beyond_quota_is_capped_with_a_condition() -> anyhow::Result<()> {
    let (s, op) = setup("quota-scale", "").await?;
    let env = &s.env;
    quota(env, 100).await?;
    deploy(env, "grow", 1, false).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    testenv::llama::wait_ready(env, &op, "grow", 60).await?;
    let out = env.run_kubectl(&["scale", "llamadeployment/grow", "--replicas=4"], None)?;
    assert!(out.success, "{}", out.stderr);
    // 100 cores: 3 instances hold ceil(3.6) × 24 = 96; 4 would hold 120.
    let (_, _, message) = wait_for(Duration::from_secs(60), || async {
        cond(&api.get("grow").await.ok()?, "ScaleLimitedByQuota").filter(|c| c.0 == "True")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;
    assert!(message.contains("capped at 3"), "{message}");
    let ld = wait_for(Duration::from_secs(60), || async {
        let ld = api.get("grow").await.ok()?;
        let i = ld.status.as_ref()?.instances.clone()?;
        (i.desired == 3 && i.ready == 3).then_some(ld)
    })
    .await?;
    assert_eq!(ld.status.and_then(|s| s.reserved_cores), Some(96));
    Ok(())
}

#[tokio::test]
async fn shared_quota_expires_on_time_across_a_restart_and_releases_the_pool() -> anyhow::Result<()>
{
    // 30 s of shared quota; warnings 20 s and 10 s before expiry (hours in the configuration).
    let config = format!(
        "sharedQuota: {{{FAMILY}: 96}}\nsharedQuotaHours: {}\nexpiryWarningHours: [{}, {}]\n",
        30.0 / 3600.0,
        20.0 / 3600.0,
        10.0 / 3600.0
    );
    let (s, op) = setup("quota-shared", &config).await?;
    let env = &s.env;
    quota(env, 0).await?;
    deploy(env, "borrowed", 1, true).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let ld = wait_for(Duration::from_secs(30), || async {
        let ld = api.get("borrowed").await.ok()?;
        ld.status.as_ref()?.expires_at.as_ref()?;
        Some(ld)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;
    let st = ld.status.clone().unwrap_or_default();
    assert_eq!(st.quota_source, Some(QuotaSource::Shared));
    let created = ld
        .metadata
        .creation_timestamp
        .clone()
        .map(|t| t.0)
        .ok_or_else(|| anyhow::anyhow!("no creation time"))?;
    let expires = st
        .expires_at
        .map(|t| t.0)
        .ok_or_else(|| anyhow::anyhow!("no expiresAt"))?;
    assert_eq!(expires.duration_since(created).as_secs(), 30);

    // Without acknowledgement, a second one waits (the pool has 96 − 48 = 48 left, it needs 72).
    deploy(env, "greedy", 2, true).await?;
    wait_for(Duration::from_secs(30), || async {
        cond(&api.get("greedy").await.ok()?, "QuotaExceeded").filter(|c| c.0 == "True")
    })
    .await?;

    // Restart the operator shortly before expiry: the deletion still happens on time.
    let wait_until = |t: k8s_openapi::jiff::Timestamp| async move {
        let left = t
            .duration_since(k8s_openapi::jiff::Timestamp::now())
            .as_secs_f64();
        if left > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(left)).await;
        }
    };
    wait_until(expires - k8s_openapi::jiff::SignedDuration::from_secs(8)).await;
    op.kill();
    let op = start(env, &s.config)?;
    let gone = wait_for(Duration::from_secs(40), || async {
        api.get_opt("borrowed")
            .await
            .ok()?
            .is_none()
            .then(k8s_openapi::jiff::Timestamp::now)
    })
    .await
    .map_err(|e| anyhow::anyhow!("not deleted: {e}\n{}", op.log_text()))?;
    let late = gone.duration_since(expires).as_secs_f64();
    assert!(
        (-1.0..=5.0).contains(&late),
        "deleted {late:.1} s after expiresAt"
    );

    let events = env.run_kubectl(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=borrowed",
            "-o",
            "custom-columns=R:.reason",
        ],
        None,
    )?;
    assert!(
        events.stdout.contains("ExpiringSoon") && events.stdout.contains("Expired"),
        "{}",
        events.stdout
    );
    // The pool is released: the waiting deployment is admitted on it.
    let start_wait = Instant::now();
    wait_for(Duration::from_secs(40), || async {
        let ld = api.get("greedy").await.ok()?;
        (ld.status?.quota_source == Some(QuotaSource::Shared)).then_some(())
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "pool not released ({:?}): {e}\n{}",
            start_wait.elapsed(),
            op.log_text()
        )
    })?;
    Ok(())
}

#[tokio::test]
async fn core_hours_accrue_survive_restarts_and_deletion() -> anyhow::Result<()> {
    let (s, op) = setup("quota-cost", "accrualSeconds: 1\n").await?;
    let env = &s.env;
    quota(env, 1000).await?;
    deploy(env, "billed", 2, false).await?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    testenv::llama::wait_ready(env, &op, "billed", 60).await?;

    // Simulate 2.5 hours: move the operator's clock forward, and restart it on the way.
    std::fs::write(&s.config, "accrualSeconds: 1\nclockOffsetSeconds: 9000\n")?;
    op.kill();
    let op = start(env, &s.config)?;
    let hours = wait_for(Duration::from_secs(60), || async {
        let h = api.get("billed").await.ok()?.status?.core_hours?;
        (h > 119.0).then_some(h)
    })
    .await
    .map_err(|e| anyhow::anyhow!("no accrual: {e}\n{}", op.log_text()))?;
    // 2 instances × 24 cores × 2.5 h = 120 core-hours (± 1 %: a few real seconds on top).
    assert!((hours - 120.0).abs() <= 1.2, "{hours} core-hours");
    let ld = api.get("billed").await?;
    let st = ld.status.unwrap_or_default();
    let cost = st.estimated_cost.unwrap_or_default();
    assert!(
        (cost - 2.0 * 2.5 * 3.673).abs() <= 0.01 * 18.365,
        "cost {cost}"
    );
    assert_eq!(st.currency.as_deref(), Some("USD"));

    // Printer columns show it.
    let out = env.run_kubectl(&["get", "llama", "billed"], None)?;
    assert!(out.stdout.contains("CORE-HOURS"), "{}", out.stdout);

    // Another restart: totals only grow, and the Prometheus counters start from them.
    op.kill();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let c = s.config.to_string_lossy().into_owned();
    let op = OperatorProcess::start(
        env,
        Path::new(OPERATOR),
        &["--config", &c, "--metrics-addr", &addr],
    )?;
    let metrics = wait_for(Duration::from_secs(30), || async {
        let text = scrape(&addr).ok()?;
        text.contains("llama_deployment_core_hours_total{")
            .then_some(text)
    })
    .await
    .map_err(|e| anyhow::anyhow!("no cost metrics: {e}\n{}", op.log_text()))?;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("llama_deployment_core_hours_total{") && l.contains("name=\"billed\"")
        })
        .unwrap_or_default();
    assert!(
        line.contains("instance_type=\"Standard_NC24ads_A100_v4\""),
        "{line}"
    );
    let value: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!((value - 120.0).abs() <= 1.5, "counter {value}: {line}");
    assert!(
        metrics.contains("llama_deployment_cost_total{"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = api
        .get("billed")
        .await?
        .status
        .and_then(|s| s.core_hours)
        .unwrap_or_default();
    assert!(
        again >= hours,
        "core-hours went down across a restart: {hours} → {again}"
    );

    // Deleting the deployment keeps its totals in the namespace summary.
    api.delete("billed", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), || async {
        api.get_opt("billed").await.ok()?.is_none().then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;
    let cq = Api::<ComputeQuota>::namespaced(env.client.clone(), &env.namespace)
        .get("default")
        .await?;
    let summary = cq.status.unwrap_or_default();
    let retired = summary.retired_core_hours.unwrap_or_default();
    assert!(
        retired >= again && (retired - 120.0).abs() <= 1.2,
        "retired {retired}"
    );
    assert!(summary.core_hours.unwrap_or_default() >= retired);
    let entries: Vec<_> = summary
        .recently_retired
        .iter()
        .filter(|r| r.name == "billed")
        .collect();
    assert_eq!(entries.len(), 1, "{:?}", summary.recently_retired);
    assert_eq!(entries[0].core_hours, retired);
    assert!(!entries[0].uid.is_empty() && entries[0].retired_at.is_some());
    drop(op);
    Ok(())
}
