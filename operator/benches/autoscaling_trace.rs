//! Autoscaling trace (a benchmark, not a test): one LlamaDeployment of the demo model on the real
//! control plane, real `llama-server` processes behind its simulated pods, and a step of load from
//! `llama-load`. Samples every second — time, load (clients and requests in flight), the
//! autoscaler's decision, ready instances, nodes — into docs/benchmarks/autoscaling-trace.csv,
//! and writes the timings (load increase → decision → new instances serving, load removed →
//! scale-down → nodes released) to docs/benchmarks/autoscaling.md. The plot is drawn by
//! scripts/plot-autoscaling-trace.py (scripts/bench-autoscaling.sh runs both).
//!
//! Run: `scripts/bench-autoscaling.sh` (or `cargo bench -p llama-operator --bench autoscaling_trace`).

#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use common::{Load, cluster, spec};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use testenv::llama::{apply, wait_ready};

const IDLE_BEFORE: u64 = 20;
const LOAD_SECONDS: u64 = 90;
const CLIENTS: usize = 12;
const TARGET_IN_FLIGHT: u32 = 4;
const SCRAPE_INTERVAL: u64 = 5;
const STABILIZATION: u64 = 60;

#[derive(Clone, Debug)]
struct Row {
    t: f64,
    clients: usize,
    in_flight: f64,
    desired: i32,
    ready: i32,
    nodes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let c = cluster("autoscale-trace").await?;
    let targets = format!(
        "{{targetRequestsInFlight: {TARGET_IN_FLIGHT}, scrapeIntervalSeconds: {SCRAPE_INTERVAL}, scaleDownStabilizationSeconds: {STABILIZATION}}}"
    );
    apply(&c.env, "trace", &spec(1, 1, 4, &targets)).await?;
    wait_ready(&c.env, &c.op, "trace", 180).await?;
    let (endpoint, key) = c.endpoint("trace").await?;

    let clients = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut load: Option<Load> = None;
    let mut load_started = None;
    let mut load_stopped = None;
    let (mut decided_up, mut serving, mut decided_down, mut released) = (None, None, None, None);
    let mut peak_ready = 1;
    let mut report = String::new();
    loop {
        let t = start.elapsed();
        if load.is_none() && load_started.is_none() && t >= Duration::from_secs(IDLE_BEFORE) {
            load = Some(Load::run_for(&endpoint, &key, CLIENTS, LOAD_SECONDS)?);
            clients.store(CLIENTS, Ordering::Relaxed);
            load_started = Some(t);
        }
        if let (Some(began), None) = (load_started, load_stopped)
            && t >= began + Duration::from_secs(LOAD_SECONDS)
            && let Some(l) = load.take()
        {
            report = tokio::task::spawn_blocking(move || l.report()).await??;
            clients.store(0, Ordering::Relaxed);
            load_stopped = Some(start.elapsed());
        }
        let (counts, auto) = c.state("trace").await.unwrap_or_default();
        let nodes = c.nodes("trace").await.unwrap_or(0);
        let row = Row {
            t: t.as_secs_f64(),
            clients: clients.load(Ordering::Relaxed),
            in_flight: auto.load.requests_in_flight,
            desired: auto.desired_instances,
            ready: counts.ready,
            nodes,
        };
        if load_started.is_some() && load_stopped.is_none() {
            if decided_up.is_none() && row.desired > 1 {
                decided_up = Some(t);
            }
            if serving.is_none() && row.ready > 1 {
                serving = Some(t);
            }
            peak_ready = peak_ready.max(row.ready);
        }
        if load_stopped.is_some() {
            if decided_down.is_none() && row.desired == 1 {
                decided_down = Some(t);
            }
            if released.is_none() && row.desired == 1 && row.nodes == 1 && row.ready == 1 {
                released = Some(t);
            }
        }
        eprintln!(
            "t={:6.1}s clients={:2} inflight={:5.1} desired={} ready={} nodes={}",
            row.t, row.clients, row.in_flight, row.desired, row.ready, row.nodes
        );
        rows.push(row);
        if let Some(done) = released
            && t >= done + Duration::from_secs(15)
        {
            break;
        }
        anyhow::ensure!(
            t < Duration::from_secs(IDLE_BEFORE + LOAD_SECONDS + STABILIZATION + 180),
            "the trace did not return to one instance:\n{}",
            c.op.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(start.elapsed() - t)).await;
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut csv = String::from(
        "seconds,clients,requests_in_flight,desired_instances,ready_instances,nodes\n",
    );
    for r in &rows {
        writeln!(
            csv,
            "{:.1},{},{},{},{},{}",
            r.t, r.clients, r.in_flight, r.desired, r.ready, r.nodes
        )?;
    }
    std::fs::write(root.join("docs/benchmarks/autoscaling-trace.csv"), csv)?;

    let since = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} s", b.saturating_sub(a).as_secs_f64()),
        _ => "not reached".to_owned(),
    };
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    writeln!(md, "# Autoscaling trace\n")?;
    writeln!(
        md,
        "Written by `scripts/bench-autoscaling.sh` (operator/benches/autoscaling_trace.rs) on {machine}, {cores} cores. \
The real control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok) runs the operator's kwok GPU nodes; \
the pod runner starts a real `llama-server` (the demo model, CPU) for each server pod and reports it Ready only when its \
/health/ready answers; `llama-load` drives one instance's endpoint with streaming clients.\n"
    )?;
    writeln!(
        md,
        "Settings: minInstances 1, maxInstances 4, targetRequestsInFlight {TARGET_IN_FLIGHT}, scrapeIntervalSeconds {SCRAPE_INTERVAL}, \
scaleDownStabilizationSeconds {STABILIZATION}. Load: {CLIENTS} clients for {LOAD_SECONDS} s after {IDLE_BEFORE} s idle.\n"
    )?;
    writeln!(
        md,
        "![instances and load over time](autoscaling-trace.png)\n"
    )?;
    writeln!(md, "| step | time |\n|---|---|")?;
    writeln!(
        md,
        "| load increase → scale-up decision | {} |",
        since(load_started, decided_up)
    )?;
    writeln!(
        md,
        "| load increase → first new instance serving (Ready: its /health/ready answers) | {} |",
        since(load_started, serving)
    )?;
    writeln!(md, "| instances at peak | {peak_ready} |")?;
    writeln!(
        md,
        "| load removed → scale-down decision (stabilization window {STABILIZATION} s) | {} |",
        since(load_stopped, decided_down)
    )?;
    writeln!(
        md,
        "| load removed → back to 1 instance on 1 node (emptied nodes deleted) | {} |",
        since(load_stopped, released)
    )?;
    writeln!(
        md,
        "\nThe load generator's summary over the load step:\n\n```text\n{}```\n",
        report
    )?;
    writeln!(
        md,
        "Raw samples (one per second): [autoscaling-trace.csv](autoscaling-trace.csv)."
    )?;
    std::fs::write(root.join("docs/benchmarks/autoscaling.md"), &md)?;
    println!("{md}");
    Ok(())
}
