//! `dev-cluster`: the test control plane for people. Starts etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok on loopback, installs the CRDs, applies the
//! given manifests, prints how to reach it, and stops everything on Ctrl-C (or at once with
//! `--exit`). With `--server BINARY`, once the deployments are Ready it starts a real
//! `llama-server` for each, configured from the deployment's own ConfigMap and keys Secret (it
//! stands in for the pod, whose container kwok does not run), and sends it a chat completion.
//! With `--pod-runner` as well, the LlamaDeployments of the `--apply` files are opted in to the
//! pod runner (`nodePool.nodeSelector` gets `llama-operator.io/pod-runner: real`): each of their
//! pods gets a real `llama-server` on the pod's IP, run by `testenv::pod_runner` (needs root or
//! CAP_NET_ADMIN for the pod IPs' local route; see docs/testing.md), and the chat completion goes
//! to the addresses the Service's EndpointSlice lists, as a client in the cluster reaches them.

use serde::Deserialize;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

const USAGE: &str = "usage: dev-cluster [--operator BINARY] [--chart DIR] [--server BINARY] \
                     [--pod-runner] [--apply FILE]... [--exit]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut manifests = Vec::new();
    let mut exit = false;
    let mut operator = None;
    let mut server = None;
    let mut chart = None;
    let mut pod_runner = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--apply" => match args.next() {
                Some(file) => manifests.push(file),
                None => return usage("--apply needs a file"),
            },
            "--exit" => exit = true,
            "--pod-runner" => pod_runner = true,
            "--operator" => match args.next() {
                Some(path) => operator = Some(std::path::PathBuf::from(path)),
                None => return usage("--operator needs the llama-operator binary"),
            },
            "--chart" => match args.next() {
                Some(path) => chart = Some(std::path::PathBuf::from(path)),
                None => return usage("--chart needs the chart directory"),
            },
            "--server" => match args.next() {
                Some(path) => server = Some(std::path::PathBuf::from(path)),
                None => return usage("--server needs the llama-server binary"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unexpected argument {other:?}")),
        }
    }
    if pod_runner && (server.is_none() || operator.is_none()) {
        return usage("--pod-runner needs --operator and --server");
    }
    match run(&manifests, exit, operator, server, chart, pod_runner).await {
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

/// When the previous step ended.
static LAST_STEP: Mutex<Option<Instant>> = Mutex::new(None);

/// Prints a finished step with its own duration and the time since the start.
fn step(what: &str, t0: Instant) {
    let now = Instant::now();
    let mut last = LAST_STEP.lock().unwrap_or_else(|p| p.into_inner());
    let took = now.duration_since(last.unwrap_or(t0)).as_secs_f64();
    *last = Some(now);
    println!(
        "==> {what} ({took:.1} s; {:.1} s in all)",
        now.duration_since(t0).as_secs_f64()
    );
}

/// The manifest file with its LlamaDeployments opted in to the pod runner.
fn opted_in(file: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        if value["kind"] == "LlamaDeployment" {
            let pool = &mut value["spec"]["nodePool"];
            if pool.is_null() {
                *pool = serde_yaml::Value::Mapping(Default::default());
            }
            let selector = &mut pool["nodeSelector"];
            if selector.is_null() {
                *selector = serde_yaml::Value::Mapping(Default::default());
            }
            selector[testenv::pod_runner::POD_RUNNER_LABEL] = serde_yaml::Value::from("real");
        }
        out.push(serde_yaml::to_string(&value)?);
    }
    Ok(out.join("---\n"))
}

async fn run(
    manifests: &[String],
    exit: bool,
    operator: Option<std::path::PathBuf>,
    server: Option<std::path::PathBuf>,
    chart: Option<std::path::PathBuf>,
    pod_runner: bool,
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
    // With a chart, the CRDs come from the chart's crds/ (helm installs them first).
    if chart.is_none() {
        let crds = testenv::install_crds(&client).await?;
        step(
            &format!("CRDs installed and Established: {}", crds.join(", ")),
            t0,
        );
    }
    if let (Some(binary), Some(chart)) = (&operator, &chart) {
        let notes = testenv::chart_install::helm_install(plane, chart)?;
        step(
            &format!(
                "helm install {} {} --namespace {} (CRDs, ServiceAccount, RBAC, config)",
                testenv::chart_install::RELEASE,
                chart.display(),
                testenv::chart_install::NAMESPACE
            ),
            t0,
        );
        print!("{notes}");
        let log = testenv::chart_install::run_operator_as_chart(plane, binary)?;
        step(
            &format!(
                "llama-operator running as the chart's ServiceAccount, with the chart's arguments \
                 and configuration (log: {})",
                log.display()
            ),
            t0,
        );
    } else if let Some(binary) = &operator {
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
        let out = if pod_runner {
            use std::io::Write;
            let manifest = opted_in(file)?;
            let mut child = plane
                .kubectl()
                .args(["apply", "--server-side", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .ok_or_else(|| anyhow::anyhow!("kubectl has no stdin"))?
                .write_all(manifest.as_bytes())?;
            child.wait_with_output()?
        } else {
            plane
                .kubectl()
                .args(["apply", "--server-side", "-f", file])
                .output()?
        };
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            anyhow::bail!(
                "kubectl apply -f {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let how = if pod_runner {
            format!(
                " (LlamaDeployments opted in to the pod runner: nodePool.nodeSelector {}: real)",
                testenv::pod_runner::POD_RUNNER_LABEL
            )
        } else {
            String::new()
        };
        step(&format!("applied {file}{how}"), t0);
    }
    let mut runners = Vec::new();
    if let (true, Some(binary)) = (pod_runner, &server) {
        for namespace in runner_namespaces(&client).await? {
            runners.push(testenv::PodRunner::start(client.clone(), &namespace, binary).await?);
            step(
                &format!(
                    "pod runner serving the opted-in pods of namespace {namespace} (pod IPs in {})",
                    testenv::pod_runner::POD_CIDR
                ),
                t0,
            );
        }
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
    let mut servers = Vec::new();
    if let (Some(binary), true) = (&server, operator.is_some()) {
        let deployments: kube::Api<llama_operator::api::LlamaDeployment> =
            kube::Api::all(client.clone());
        for ld in deployments.list(&Default::default()).await?.items {
            let (Some(ns), Some(name)) = (ld.metadata.namespace.clone(), ld.metadata.name.clone())
            else {
                continue;
            };
            if pod_runner && opts_in(&ld) {
                chat_through_pods(&client, &runners, &ns, &name, t0).await?;
                continue;
            }
            println!(
                "==> starting llama-server for {ns}/{name} from its ConfigMap and keys Secret \
                 (a local process standing in for the pod: kwok runs no containers)"
            );
            let local =
                testenv::local_server::start_for(&client, &ns, &name, binary, &plane.dir).await?;
            step(&format!("llama-server ready at {}", local.endpoint), t0);
            let answer = local.chat("Hello! Who are you?", 16).await?;
            step("chat completion answered", t0);
            println!("{}", serde_json::to_string_pretty(&answer)?);
            println!(
                "(random weights: the demo model's words are noise; the API, tokenizer, keys and \
                 limits are real)\nCall it yourself:\n  curl -s {}/chat/completions -H 'api-key: \
                 {}' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":16}}'",
                local.endpoint, local.key
            );
            servers.push(local);
        }
    }
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
        "Clean up: press Ctrl-C; it stops every process and deletes the control plane's data. \
         The built tools stay cached in ~/.cache/llama-operator (delete it to reclaim the space)."
    );
    tokio::signal::ctrl_c().await?;
    println!("==> stopping");
    Ok(())
}

/// Whether a deployment's pods select the pod runner's nodes.
fn opts_in(ld: &llama_operator::api::LlamaDeployment) -> bool {
    ld.spec
        .node_pool
        .node_selector
        .contains_key(testenv::pod_runner::POD_RUNNER_LABEL)
}

/// The namespaces with deployments that opt in to the pod runner.
async fn runner_namespaces(client: &kube::Client) -> anyhow::Result<Vec<String>> {
    let deployments: kube::Api<llama_operator::api::LlamaDeployment> =
        kube::Api::all(client.clone());
    let mut namespaces: Vec<String> = deployments
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|ld| opts_in(ld))
        .filter_map(|ld| ld.metadata.namespace.clone())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    Ok(namespaces)
}

/// Prints the servers the pod runner runs for deployment `ns/name`, then sends a chat
/// completion to every ready address of the deployment's Service, as its EndpointSlice lists
/// them (what kube-proxy would route `status.endpoint` to).
async fn chat_through_pods(
    client: &kube::Client,
    runners: &[testenv::PodRunner],
    ns: &str,
    name: &str,
    t0: Instant,
) -> anyhow::Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let key = testenv::local_server::primary_key(client, ns, name).await?;
    let pods: Vec<testenv::pod_runner::RunnerPod> = runners
        .iter()
        .flat_map(|r| r.pods())
        .filter(|p| {
            p.labels
                .get(llama_operator::build::DEPLOYMENT_NAME_LABEL)
                .map(String::as_str)
                == Some(name)
        })
        .collect();
    anyhow::ensure!(
        !pods.is_empty(),
        "the pod runner runs no pod of {ns}/{name}"
    );
    for pod in &pods {
        println!(
            "==> {ns}/{name}: pod {} runs llama-server at {} (log: {})",
            pod.name,
            pod.endpoint,
            pod.log.display()
        );
    }
    // The controller-manager fills the Service's EndpointSlices from the pods' status.
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), ns);
    let selector = format!("kubernetes.io/service-name={name}");
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let addresses = loop {
        let mut found = Vec::new();
        for slice in slices
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?
            .items
        {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find_map(|p| p.port)
                .unwrap_or(8080);
            for endpoint in slice.endpoints.iter().flatten() {
                if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                    for ip in &endpoint.addresses {
                        found.push(format!("http://{ip}:{port}"));
                    }
                }
            }
        }
        if found.len() >= pods.len() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    anyhow::ensure!(
        !addresses.is_empty(),
        "the EndpointSlice of Service {ns}/{name} lists no ready address"
    );
    step(
        &format!(
            "Service {ns}/{name}: its EndpointSlice lists {}",
            addresses.join(", ")
        ),
        t0,
    );
    for address in &addresses {
        let answer = testenv::local_server::chat(address, &key, "Hello! Who are you?", 16).await?;
        step(
            &format!("chat completion answered through the endpoint address {address}"),
            t0,
        );
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    println!(
        "(random weights: the demo model's words are noise; the API, tokenizer, keys and limits \
         are real)\nCall it yourself:\n  curl -s {}/chat/completions -H 'api-key: {key}' -d \
         '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}],\"max_tokens\":16}}'",
        addresses[0]
    );
    Ok(())
}
