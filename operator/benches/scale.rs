//! Operator scale benchmark (not a test): N LlamaDeployments applied at once on the real control
//! plane with kwok GPU nodes. Prints the time until all are Ready, reconcile p50/p99, API requests
//! per reconcile and the operator's peak memory, and writes them to
//! docs/benchmarks/operator-scale.md.
//!
//! Run: `cargo bench -p llama-operator --bench scale` (LLAMA_SCALE_N=200 by default).

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use llama_operator::api::LlamaDeployment;
use std::path::Path;
use std::time::{Duration, Instant};
use testenv::{FIELD_MANAGER, OperatorProcess, TestEnv};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("LLAMA_SCALE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let env = TestEnv::new("scale").await?;
    env.install_crds().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &["--metrics-addr", &addr])?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("ld-{i:04}");
                let body: serde_json::Value = serde_yaml::from_str(&format!(
                    "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: {name}}}\nspec: {{model: Meta-Llama-3.2-1B-Instruct, source: {{type: demo}}, nodePool: {{provider: kwok}}}}\n"
                ))?;
                api.patch(&name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&body)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let applied = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut ready = 0;
    while Instant::now() < deadline {
        let list = api.list(&ListParams::default()).await?;
        ready = list
            .items
            .iter()
            .filter(|ld| {
                ld.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ready = t0.elapsed();
    anyhow::ensure!(
        ready == n,
        "only {ready}/{n} Ready after 15 minutes\n{}",
        op.log_text()
    );

    let metrics = testenv::llama::scrape(&addr)?;
    let runs = metric(&metrics, "llama_operator_reconcile_runs_total");
    let requests = metric(&metrics, "llama_operator_api_requests_total");
    let p50 = quantile(&metrics, 0.50);
    let p99 = quantile(&metrics, 0.99);
    let peak_mib = peak_rss_kib(op.pid()) as f64 / 1024.0;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let table = format!(
        "| metric | value |\n| --- | --- |\n\
         | LlamaDeployments | {n} |\n\
         | applied (32 concurrent clients) | {:.1} s |\n\
         | all Ready (nodes, pods, status) | {:.1} s |\n\
         | reconciles | {runs:.0} ({:.1} per deployment) |\n\
         | reconcile duration p50 | ≤ {p50} s |\n\
         | reconcile duration p99 | ≤ {p99} s |\n\
         | API requests per reconcile | {:.1} |\n\
         | operator peak RSS | {peak_mib:.1} MiB |\n",
        applied.as_secs_f64(),
        all_ready.as_secs_f64(),
        runs / n as f64,
        requests / runs.max(1.0),
    );
    println!("\n{table}");
    let doc = format!(
        "# Operator scale benchmark\n\n`cargo bench -p llama-operator --bench scale` — {n} LlamaDeployments (Meta-Llama-3.2-1B-Instruct, \
         one kwok instance each) applied at once to the test control plane (etcd, kube-apiserver, \
         controller-manager, scheduler and kwok all on the same machine as the operator: {cores} cores). \
         Durations are bucket upper bounds of the operator's `llama_operator_reconcile_duration_seconds` histogram.\n\n{table}"
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks/operator-scale.md");
    std::fs::write(&out, doc)?;
    println!("written to {}", out.display());
    Ok(())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0)
}

/// The upper bound of the histogram bucket holding quantile `q`.
fn quantile(text: &str, q: f64) -> String {
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter(|l| l.starts_with("llama_operator_reconcile_duration_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            let count = l.split_whitespace().last()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| le.clone())
        .unwrap_or_else(|| "?".into())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}
