//! `dev-cluster`: the test control plane for people. Starts etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok on loopback, installs the CRDs, applies the
//! given manifests, prints how to reach it, and stops everything on Ctrl-C (or at once with
//! `--exit`).

use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: dev-cluster [--operator BINARY] [--apply FILE]... [--exit]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut manifests = Vec::new();
    let mut exit = false;
    let mut operator = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--apply" => match args.next() {
                Some(file) => manifests.push(file),
                None => return usage("--apply needs a file"),
            },
            "--exit" => exit = true,
            "--operator" => match args.next() {
                Some(path) => operator = Some(std::path::PathBuf::from(path)),
                None => return usage("--operator needs the llama-operator binary"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    match run(&manifests, exit, operator).await {
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

async fn run(
    manifests: &[String],
    exit: bool,
    operator: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
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
    if let Some(binary) = &operator {
        let log = plane.dir.join("llama-operator.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = std::process::Command::new(binary);
        cmd.args(["--metrics-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", &plane.kubeconfig)
            .stdout(file.try_clone()?)
            .stderr(file);
        testenv::processes::spawn("llama-operator", cmd)?;
        step(
            &format!("llama-operator running (log: {})", log.display()),
            t0,
        );
    }
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
    if operator.is_some() && !manifests.is_empty() {
        println!("==> waiting for every LlamaDeployment to be Ready (simulated GPU nodes, pods)");
        let out = plane
            .kubectl()
            .args([
                "wait",
                "llamadeployments",
                "--all",
                "-A",
                "--for=condition=Ready",
                "--timeout=120s",
            ])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            anyhow::bail!("not Ready: {}", String::from_utf8_lossy(&out.stderr));
        }
        step("Ready", t0);
        let nodes = plane
            .kubectl()
            .args([
                "get",
                "nodes",
                "-L",
                "node.kubernetes.io/instance-type,nvidia.com/gpu.product",
            ])
            .output()?;
        println!("{}", String::from_utf8_lossy(&nodes.stdout));
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
    println!(
        "Clean up: press Ctrl-C; it stops every process and deletes the control plane's data."
    );
    tokio::signal::ctrl_c().await?;
    println!("==> stopping");
    Ok(())
}
