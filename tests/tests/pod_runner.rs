//! Real servers behind simulated pods: a LlamaDeployment on kwok nodes labelled for the pod
//! runner gets a real `llama-server` per pod, on the pod's own IP; the pods are Ready only when
//! their servers are, the Service's EndpointSlice (kept by the real controller-manager) lists
//! exactly those servers, and they answer chat completions with the deployment's key.

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use llama_operator::api::LlamaDeployment;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testenv::local_server::{chat, primary_key, server_binary, start_for};
use testenv::operator::operator_binary;
use testenv::pod_runner::{POD_RUNNER_LABEL, PodRunner, RunnerPod};
use testenv::{OperatorProcess, TestEnv, llama, wait_for};

const SPEC: &str = "  model: Meta-Llama-3.2-1B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC24ads_A100_v4, instanceCount: 2}\n  nodePool: {provider: kwok, nodeSelector: {llama-operator.io/pod-runner: real}}\n";

/// (pod, podIP, Ready) as seen by a watch on the namespace's pods, in order.
type Seen = Arc<Mutex<Vec<(String, Option<String>, bool)>>>;

fn observe_pods(env: &TestEnv) -> Seen {
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    let api: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    tokio::spawn(async move {
        let mut pods = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(Ok(pod)) = pods.next().await {
            let status = pod.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if let Ok(mut seen) = log.lock() {
                seen.push((pod.metadata.name.unwrap_or_default(), status.pod_ip, ready));
            }
        }
    });
    seen
}

fn pod_ready(pod: &Pod) -> Option<bool> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    Some(
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    )
}

/// The (address, ready) endpoints of the Service's EndpointSlices.
async fn endpoints(env: &TestEnv, service: &str) -> BTreeMap<String, bool> {
    let api: Api<EndpointSlice> = Api::namespaced(env.client.clone(), &env.namespace);
    let slices = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for slice in slices {
        for endpoint in slice.endpoints.unwrap_or_default() {
            let ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(false);
            for address in endpoint.addresses {
                out.insert(address, ready);
            }
        }
    }
    out
}

fn accepts(ip: &str, port: u16) -> bool {
    ip.parse()
        .ok()
        .map(|ip: std::net::IpAddr| SocketAddr::from((ip, port)))
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
}

fn diagnostics(runner: &PodRunner, op: &OperatorProcess) -> String {
    let logs: Vec<String> = runner
        .pods()
        .iter()
        .map(|p| {
            format!(
                "--- {} log:\n{}",
                p.name,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "pod runner:\n{}\n{}\noperator log:\n{}",
        runner.events(),
        logs.join("\n"),
        op.log_text()
    )
}

/// Waits until the runner runs `n` pods, all Ready.
async fn ready_pods(runner: &PodRunner, n: usize, secs: u64) -> anyhow::Result<Vec<RunnerPod>> {
    wait_for(Duration::from_secs(secs), || async {
        let pods = runner.pods();
        (pods.len() == n && pods.iter().all(|p| p.ready)).then_some(pods)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_servers_run_behind_simulated_pods() -> anyhow::Result<()> {
    let env = TestEnv::new("pod-runner").await?;
    env.install_crds().await?;
    let runner = PodRunner::start(env.client.clone(), &env.namespace, &server_binary()?).await?;
    let op = OperatorProcess::start(&env, &operator_binary()?, &[])?;
    let seen = observe_pods(&env);
    llama::apply(&env, "chat", SPEC).await?;

    // The operator hands the pods to the runner through their nodeSelector.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), &env.namespace);
    let template_selector = wait_for(Duration::from_secs(60), || async {
        let d = deployments.get_opt("chat").await.ok()??;
        d.spec?.template.spec?.node_selector
    })
    .await
    .with_context(|| format!("no Deployment chat\n{}", op.log_text()))?;
    anyhow::ensure!(
        template_selector.get(POD_RUNNER_LABEL).map(String::as_str) == Some("real"),
        "the pod template's nodeSelector {template_selector:?} lacks {POD_RUNNER_LABEL}: the \
         operator must copy spec.nodePool.nodeSelector into the pods of a kwok pool"
    );

    let pods = ready_pods(&runner, 2, 180)
        .await
        .with_context(|| diagnostics(&runner, &op))?;
    llama::wait_ready(&env, &op, "chat", 60).await?;
    let ips: BTreeSet<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    for pod in &pods {
        assert!(pod.ip.octets()[..2] == [10, 246], "{pod:?}");
        assert_eq!(pod.port, 8080);
        let log = std::fs::read_to_string(&pod.log)?;
        assert!(log.contains("model loaded; ready"), "{log}");
    }

    // Each pod was Running with its IP, yet not Ready, before its server answered.
    let history = seen.lock().map(|s| s.clone()).unwrap_or_default();
    for pod in &pods {
        let mine: Vec<_> = history.iter().filter(|(n, _, _)| *n == pod.name).collect();
        let first_ready = mine.iter().position(|(_, _, ready)| *ready);
        let unready_with_ip = mine
            .iter()
            .position(|(_, ip, ready)| ip.as_deref() == Some(&pod.ip.to_string()) && !ready);
        assert!(
            matches!((unready_with_ip, first_ready), (Some(u), Some(r)) if u < r),
            "{}: {mine:?}",
            pod.name
        );
    }

    // The real controller-manager points the Service at the two real servers.
    let slices = wait_for(Duration::from_secs(30), || async {
        let e = endpoints(&env, "chat").await;
        (e.keys().cloned().collect::<BTreeSet<_>>() == ips && e.values().all(|r| *r)).then_some(e)
    })
    .await
    .with_context(|| format!("EndpointSlice of chat: {:?}", ips))?;
    let key = primary_key(&env.client, &env.namespace, "chat").await?;
    for address in slices.keys() {
        let answer = chat(&format!("http://{address}:8080"), &key, "Hello!", 4).await?;
        assert_eq!(answer["model"], "Meta-Llama-3.2-1B-Instruct");
    }
    let refused = reqwest::Client::new()
        .post(format!("{}/chat/completions", pods[0].endpoint))
        .header("api-key", "0".repeat(32))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await?;
    assert_eq!(refused.status(), 401);

    // local_server runs the same pod template on loopback.
    let workdir = tempfile::tempdir()?;
    let local = start_for(
        &env.client,
        &env.namespace,
        "chat",
        &server_binary()?,
        workdir.path(),
    )
    .await?;
    assert_eq!(
        local.chat("Hi", 2).await?["model"],
        "Meta-Llama-3.2-1B-Instruct"
    );
    drop(local);

    // A server that stops answering makes its pod unready and leaves the EndpointSlice's ready
    // set; it comes back when the server does.
    let pods_api: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let paused = &pods[0];
    runner.pause(&paused.name)?;
    let ip = paused.ip.to_string();
    wait_for(Duration::from_secs(20), || async {
        let pod = pods_api.get(&paused.name).await.ok()?;
        let e = endpoints(&env, "chat").await;
        (pod_ready(&pod) == Some(false) && e.get(&ip) != Some(&true)).then_some(())
    })
    .await
    .with_context(|| format!("paused {} stayed ready\n{}", paused.name, runner.events()))?;
    assert!(!runner.pod(&paused.name).context("paused pod")?.ready);
    runner.resume(&paused.name)?;
    wait_for(Duration::from_secs(20), || async {
        let pod = pods_api.get(&paused.name).await.ok()?;
        let e = endpoints(&env, "chat").await;
        (pod_ready(&pod) == Some(true) && e.get(&ip) == Some(&true)).then_some(())
    })
    .await
    .with_context(|| format!("resumed {} not ready\n{}", paused.name, runner.events()))?;

    // A server that exits on its own is restarted, and the restart counted.
    let crashed = &pods[1];
    let pid = runner
        .pod(&crashed.name)
        .and_then(|p| p.pid)
        .context("no pid")?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    assert!(killed.success());
    let restarted = wait_for(Duration::from_secs(60), || async {
        let pod = pods_api.get(&crashed.name).await.ok()?;
        let status = pod.status.clone()?.container_statuses?.first()?.clone();
        (status.restart_count == 1 && status.ready && pod_ready(&pod) == Some(true))
            .then_some(status)
    })
    .await
    .with_context(|| format!("{} not restarted\n{}", crashed.name, runner.events()))?;
    assert!(restarted.last_state.and_then(|s| s.terminated).is_some());
    assert_eq!(runner.pod(&crashed.name).map(|p| p.restarts), Some(1));

    // Deleting a pod stops its server; the replacement pod gets a server of its own.
    pods_api
        .delete(&paused.name, &DeleteParams::default())
        .await?;
    wait_for(Duration::from_secs(60), || async {
        (runner.pod(&paused.name).is_none() && !accepts(&ip, 8080)).then_some(())
    })
    .await
    .with_context(|| format!("{} still served\n{}", paused.name, runner.events()))?;
    let now = ready_pods(&runner, 2, 120)
        .await
        .with_context(|| diagnostics(&runner, &op))?;
    let replacement = now
        .iter()
        .find(|p| p.name != paused.name && p.name != crashed.name)
        .context("no replacement pod")?;
    chat(&replacement.endpoint, &key, "Hello!", 4).await?;

    // Deleting the deployment stops every server.
    let ld: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    ld.delete("chat", &DeleteParams::default()).await?;
    let last: Vec<RunnerPod> = runner.pods();
    wait_for(Duration::from_secs(90), || async {
        (runner.pods().is_empty() && last.iter().all(|p| !accepts(&p.ip.to_string(), p.port)))
            .then_some(())
    })
    .await
    .with_context(|| format!("servers left: {:?}\n{}", runner.pods(), runner.events()))?;
    Ok(())
}
