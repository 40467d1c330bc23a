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
use std::time::{Duration, Instant};
use testenv::llama::{apply, wait_ready};

/// The load steps: (start second, clients, seconds). They overlap: 6 clients, then 8 more.
const STEPS: [(u64, usize, u64); 2] = [(15, 6, 80), (55, 8, 40)];
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

/// What happened after one load step began.
#[derive(Default)]
struct StepTimes {
    clients_after: usize,
    decided: Option<(Duration, i32)>,
    serving: Option<Duration>,
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

    let start = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut loads: Vec<Option<Load>> = STEPS.iter().map(|_| None).collect();
    let mut steps: Vec<StepTimes> = Vec::new();
    let mut reports = Vec::new();
    let load_end = STEPS
        .iter()
        .map(|(at, _, secs)| at + secs)
        .max()
        .unwrap_or(0);
    let (mut decided_down, mut released) = (None, None);
    loop {
        let t = start.elapsed();
        for (i, (at, clients, secs)) in STEPS.iter().enumerate() {
            if steps.len() == i && t >= Duration::from_secs(*at) {
                loads[i] = Some(Load::run_for(&endpoint, &key, *clients, *secs)?);
                let before: usize = STEPS[..i].iter().map(|s| s.1).sum();
                steps.push(StepTimes {
                    clients_after: before + clients,
                    ..Default::default()
                });
            }
        }
        let clients: usize = STEPS
            .iter()
            .filter(|(at, _, secs)| {
                t >= Duration::from_secs(*at) && t < Duration::from_secs(at + secs)
            })
            .map(|s| s.1)
            .sum();
        let (counts, auto) = c.state("trace").await.unwrap_or_default();
        let nodes = c.nodes("trace").await.unwrap_or(0);
        let row = Row {
            t: t.as_secs_f64(),
            clients,
            in_flight: auto.load.requests_in_flight,
            desired: auto.desired_instances,
            ready: counts.ready,
            nodes,
        };
        // Each step: the first decision above the count before it, then all of those serving.
        let before = steps
            .len()
            .checked_sub(2)
            .and_then(|i| steps[i].decided.map(|d| d.1))
            .unwrap_or(1);
        let current = steps.len().saturating_sub(1);
        if let Some(step) = steps.last_mut()
            && t < Duration::from_secs(load_end)
        {
            let began = Duration::from_secs(STEPS[current].0);
            if step.decided.is_none() && row.desired > before {
                step.decided = Some((t - began, row.desired));
            }
            if let (Some((_, want)), None) = (step.decided, step.serving)
                && row.ready >= want
            {
                step.serving = Some(t - began);
            }
        }
        if t >= Duration::from_secs(load_end) {
            let quiet = Duration::from_secs(load_end);
            if decided_down.is_none() && row.desired == 1 {
                decided_down = Some(t - quiet);
            }
            if released.is_none() && row.desired == 1 && row.nodes == 1 && row.ready == 1 {
                released = Some(t - quiet);
            }
        }
        eprintln!(
            "t={:6.1}s clients={:2} inflight={:5.1} desired={} ready={} nodes={}",
            row.t, row.clients, row.in_flight, row.desired, row.ready, row.nodes
        );
        rows.push(row);
        if let Some(done) = released
            && t >= Duration::from_secs(load_end) + done + Duration::from_secs(15)
        {
            break;
        }
        anyhow::ensure!(
            t < Duration::from_secs(load_end + STABILIZATION + 180),
            "the trace did not return to one instance:\n{}",
            c.op.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(start.elapsed() - t)).await;
    }
    for load in loads.into_iter().flatten() {
        reports.push(tokio::task::spawn_blocking(move || load.report()).await??);
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

    let secs = |d: Option<Duration>| {
        d.map_or_else(
            || "not reached".to_owned(),
            |d| format!("{:.1} s", d.as_secs_f64()),
        )
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
scaleDownStabilizationSeconds {STABILIZATION}. Load steps (start, clients, duration): {STEPS:?}; every server is the release build.\n"
    )?;
    writeln!(
        md,
        "![instances and load over time](autoscaling-trace.png)\n"
    )?;
    writeln!(
        md,
        "| load step | instances decided | load increase → decision | load increase → all decided instances serving (Ready: /health/ready answers) |\n|---|---|---|---|"
    )?;
    for (i, step) in steps.iter().enumerate() {
        writeln!(
            md,
            "| {} → {} clients at {} s | {} | {} | {} |",
            STEPS[..i].iter().map(|s| s.1).sum::<usize>(),
            step.clients_after,
            STEPS[i].0,
            step.decided
                .map_or_else(|| "-".to_owned(), |d| d.1.to_string()),
            secs(step.decided.map(|d| d.0)),
            secs(step.serving),
        )?;
    }
    writeln!(
        md,
        "\n| load removed | time |\n|---|---|\n| → scale-down decision (stabilization window {STABILIZATION} s) | {} |\n| → back to 1 instance on 1 node (emptied nodes deleted) | {} |",
        secs(decided_down),
        secs(released)
    )?;
    writeln!(
        md,
        "\nThe load generator's summaries (one per step; all of it goes to the first instance's endpoint):\n"
    )?;
    for report in &reports {
        writeln!(md, "```text\n{report}```\n")?;
    }
    writeln!(
        md,
        "Raw samples (one per second): [autoscaling-trace.csv](autoscaling-trace.csv)."
    )?;
    std::fs::write(root.join("docs/benchmarks/autoscaling.md"), &md)?;
    println!("{md}");
    Ok(())
}
