//! The `llama-operator` binary.

use futures::StreamExt;
use llama_operator::config::OperatorConfig;
use llama_operator::controller::{self, Context, Scope};
use llama_operator::leader::{LeaderElector, LeaseSettings};
use llama_operator::metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: llama-operator [--config FILE] [--namespace NS] [--metrics-addr ADDR:PORT]
                      [--leader-elect --lease-namespace NS [--lease-name NAME]]

  --config FILE         operator configuration (YAML; usually a mounted ConfigMap), re-read when it changes
  --namespace NS        serve LlamaDeployments of this namespace only (default: all namespaces)
  --metrics-addr ADDR   where /metrics, /healthz and /readyz are served (default 0.0.0.0:8080)
  --leader-elect        reconcile only while holding a Lease, so that replicas never reconcile at once
  --lease-namespace NS  namespace of the Lease (default: POD_NAMESPACE, else --namespace, else default)
  --lease-name NAME     name of the Lease (default llama-operator-leader)

The Kubernetes connection comes from the in-cluster service account or KUBECONFIG.";

struct Args {
    config: Option<PathBuf>,
    scope: Scope,
    metrics_addr: SocketAddr,
    leader_elect: bool,
    lease_namespace: Option<String>,
    lease_name: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        scope: Scope::Cluster,
        metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
        leader_elect: false,
        lease_namespace: None,
        lease_name: "llama-operator-leader".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => args.config = Some(PathBuf::from(value()?)),
            "--namespace" => args.scope = Scope::Namespace(value()?),
            "--leader-elect" => args.leader_elect = true,
            "--lease-namespace" => args.lease_namespace = Some(value()?),
            "--lease-name" => args.lease_name = value()?,
            "--metrics-addr" => {
                let v = value()?;
                args.metrics_addr = v
                    .parse()
                    .map_err(|e| format!("--metrics-addr {v:?}: {e}"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) if problem.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("llama-operator: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(path) => match OperatorConfig::load(path) {
            Ok(config) => config,
            Err(err) => {
                eprintln!("llama-operator: {err}");
                return ExitCode::from(2);
            }
        },
        None => OperatorConfig::default(),
    };
    let metrics = Arc::new(Metrics::default());
    let client = match counting_client(metrics.clone()).await {
        Ok(client) => client,
        Err(err) => {
            eprintln!("llama-operator: cannot connect to Kubernetes: {err}");
            return ExitCode::FAILURE;
        }
    };
    let instance =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        metrics.clone(),
        instance.clone(),
    ));

    let listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(l) => l,
        Err(err) => {
            eprintln!(
                "llama-operator: cannot listen on {}: {err}",
                args.metrics_addr
            );
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(serve_metrics(listener, metrics));

    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel::<()>(1);
    if let Some(path) = args.config.clone() {
        tokio::spawn(watch_config(path, ctx.clone(), reload_tx));
    }
    let reloads = tokio_stream_from(reload_rx);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let sigterm = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    let stop = async move {
        tokio::select! { () = shutdown => {}, () = sigterm => {} }
    };
    tracing::info!(scope = ?args.scope, "llama-operator starting");
    if !args.leader_elect {
        controller::run(ctx, args.scope, reloads, stop).await;
        tracing::info!("llama-operator stopped");
        return ExitCode::SUCCESS;
    }
    let lease_namespace = args
        .lease_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or(match &args.scope {
            Scope::Namespace(ns) => Some(ns.clone()),
            Scope::Cluster => None,
        })
        .unwrap_or_else(|| "default".into());
    let elector = LeaderElector::new(
        client,
        LeaseSettings {
            namespace: lease_namespace,
            name: args.lease_name,
            identity: instance,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        },
    );
    tokio::select! {
        () = stop => {
            tracing::info!("llama-operator stopped");
            ExitCode::SUCCESS
        }
        () = async {
            elector.acquire().await;
            tokio::select! {
                () = controller::run(ctx, args.scope, reloads, std::future::pending()) => {}
                () = elector.hold() => {}
            }
        } => {
            // Leadership lost: exit so that nothing reconciles without the lease; the Deployment
            // restarts the process, which then waits for the lease again.
            tracing::error!("leadership lost; exiting");
            ExitCode::FAILURE
        }
    }
}

/// A client from the in-cluster or KUBECONFIG configuration that counts its API requests.
async fn counting_client(metrics: Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let counter = tower::util::MapRequestLayer::new(move |request| {
        metrics.api_requests.inc();
        request
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counter)
        .build())
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<()>) -> impl futures::Stream<Item = ()> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Re-reads the configuration file every few seconds (a mounted ConfigMap changes in place);
/// a valid change takes effect and re-reconciles everything, an invalid one is logged and ignored.
async fn watch_config(path: PathBuf, ctx: Arc<Context>, reload: tokio::sync::mpsc::Sender<()>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match OperatorConfig::load(&path) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "configuration reloaded");
                ctx.set_config(config);
                let _ = reload.try_send(());
            }
            Err(err) => tracing::error!(%err, "configuration change ignored"),
        }
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    if let Err(err) = axum::serve(listener, app).await {
        tracing::error!(%err, "metrics server stopped");
    }
}
