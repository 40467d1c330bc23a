//! `dev-cluster`: the test control plane for people. Starts etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok on loopback, installs the CRDs, applies the
//! given manifests, prints how to reach it, and stops everything on Ctrl-C (or at once with
//! `--exit`).

use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: dev-cluster [--apply FILE]... [--exit]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut manifests = Vec::new();
    let mut exit = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--apply" => match args.next() {
                Some(file) => manifests.push(file),
                None => return usage("--apply needs a file"),
            },
            "--exit" => exit = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    match run(&manifests, exit).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dev-cluster: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("dev-cluster: {problem}\n{USAGE}");
    ExitCode::from(2)
}

fn step(what: &str, t0: Instant) {
    println!("==> {what} ({:.1} s)", t0.elapsed().as_secs_f64());
}

async fn run(manifests: &[String], exit: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    println!("==> building or locating the control-plane binaries (first run: ~20 min on 2 cores)");
    let plane = tokio::task::spawn_blocking(testenv::ControlPlane::shared)
        .await?
        .map_err(|e| anyhow::anyhow!("control plane did not start: {e}"))?;
    step(
        "control plane up (etcd, kube-apiserver, controller-manager, scheduler, kwok)",
        t0,
    );
    let client = testenv::client_for(&plane.kubeconfig).await?;
    let crds = testenv::install_crds(&client).await?;
    step(
        &format!("CRDs installed and Established: {}", crds.join(", ")),
        t0,
    );
    for file in manifests {
        let out = plane
            .kubectl()
            .args(["apply", "--server-side", "-f", file])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            anyhow::bail!(
                "kubectl apply -f {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        step(&format!("applied {file}"), t0);
    }
    let out = plane
        .kubectl()
        .args(["get", "llamadeployments", "-A", "-o", "wide"])
        .output()?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "Use it from another shell:\n  export KUBECONFIG={}",
        plane.kubeconfig.display()
    );
    println!("  {}/kubectl get llama -A", plane.bin_dir.display());
    println!(
        "  {}/kubectl explain llamadeployment.spec",
        plane.bin_dir.display()
    );
    if exit {
        println!("==> --exit given: stopping the control plane");
        return Ok(());
    }
    println!("Press Ctrl-C to stop the control plane and delete its data.");
    tokio::signal::ctrl_c().await?;
    println!("==> stopping");
    Ok(())
}
