//! One runner pod's life, as its kubelet would live it: an address, the volumes, the server
//! process (restarted when it exits on its own), the readiness probe, the status, and the stop.

use super::container::{self, PodFields};
use super::network::IpLease;
use super::status::{Observed, State, Terminated, now};
use super::{RunnerPod, Shared};
use crate::processes;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often readiness is probed (the operator's readinessProbe says 5 s; tests want faster).
pub const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failed probes that make a ready pod unready (the operator's failureThreshold).
pub const FAILURE_THRESHOLD: u32 = 2;
/// How often the volumes' files are refreshed from their ConfigMaps and Secrets.
const REFRESH_PERIOD: Duration = Duration::from_secs(5);
/// The longest a stopping server is given to drain before it is killed.
const MAX_GRACE: Duration = Duration::from_secs(30);
/// Delay before retrying a container that cannot be created yet, or restarting a crashed one
/// (doubled per restart, up to [`MAX_BACKOFF`]).
const RETRY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A server that ran this long before exiting is restarted after the shortest delay again.
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// Runs `pod` until `stop` turns true; returns the pod's uid.
pub async fn run(shared: Arc<Shared>, pod: Pod, mut stop: watch::Receiver<bool>) -> String {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut supervisor = match Supervisor::new(shared, pod).await {
        Ok(s) => s,
        Err(message) => {
            eprintln!("pod-runner: cannot run pod {name}: {message}");
            return uid;
        }
    };
    supervisor.live(&mut stop).await;
    supervisor.finish().await;
    uid
}

struct Supervisor {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    name: String,
    fields: PodFields,
    spec: k8s_openapi::api::core::v1::PodSpec,
    dir: PathBuf,
    grace: Duration,
    lease: IpLease,
    listen: SocketAddr,
    observed: Observed,
    http: reqwest::Client,
}

impl Supervisor {
    async fn new(shared: Arc<Shared>, pod: Pod) -> Result<Self, String> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.clone().ok_or("the pod has no spec")?;
        let (container_name, image, port) = match container::server_container(&spec) {
            Ok(c) => (
                c.name.clone(),
                c.image.clone().unwrap_or_default(),
                container::listen_port(c),
            ),
            Err(_) => (
                spec.containers
                    .first()
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
                String::new(),
                container::DEFAULT_PORT,
            ),
        };
        let lease = tokio::task::spawn_blocking(move || IpLease::acquire(port))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let node_name = spec.node_name.clone().unwrap_or_default();
        let host_ip = host_ip(&shared.client, &node_name).await;
        let fields = PodFields {
            name: name.clone(),
            namespace: shared.namespace.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name,
            host_ip: host_ip.clone(),
        };
        let grace = spec
            .termination_grace_period_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(MAX_GRACE, Duration::from_secs)
            .min(MAX_GRACE);
        let dir = shared.dir.join(format!(
            "{name}-{}",
            fields.uid.get(..8).unwrap_or(&fields.uid)
        ));
        let listen = SocketAddr::from((lease.ip(), port));
        // A fresh connection per probe, as the kubelet's.
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?;
        shared.register(RunnerPod {
            name: name.clone(),
            uid: fields.uid.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip: lease.ip(),
            port,
            endpoint: format!("http://{listen}"),
            log: dir.join("llama-server.log"),
            dir: dir.clone(),
            pid: None,
            ready: false,
            restarts: 0,
            paused: false,
        });
        Ok(Self {
            pods: Api::namespaced(shared.client.clone(), &shared.namespace),
            observed: Observed::new(listen.ip(), host_ip, container_name, image),
            shared,
            name,
            fields,
            spec,
            dir,
            grace,
            lease,
            listen,
            http,
        })
    }

    /// Creates and runs the container until told to stop.
    async fn live(&mut self, stop: &mut watch::Receiver<bool>) {
        self.report().await;
        let log = self.dir.join("llama-server.log");
        let local = loop {
            match container::prepare(
                &self.shared.client,
                &self.fields,
                &self.spec,
                &self.dir,
                self.listen,
            )
            .await
            {
                Ok(local) => break local,
                Err(err) => {
                    self.waiting("CreateContainerConfigError", err.to_string())
                        .await;
                    if stopped(stop, RETRY).await {
                        return;
                    }
                }
            }
        };
        let mut backoff = RETRY;
        loop {
            let started = now();
            let running_since = Instant::now();
            let pid = match self.shared.spawn(&self.name, || {
                container::command(
                    &self.shared.binary,
                    &local,
                    &self.shared.tokenizer_dir,
                    &self.shared.tmpdir,
                    &log,
                )
                .and_then(|cmd| processes::spawn("llama-server", cmd))
            }) {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(err) => {
                    let binary = self.shared.binary.display();
                    self.waiting("RunContainerError", format!("cannot start {binary}: {err}"))
                        .await;
                    if stopped(stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            self.shared.note(
                &self.name,
                &format!("started llama-server (pid {pid}) on {}", self.listen),
            );
            self.observed.pid = Some(pid);
            self.observed.state = State::Running {
                since: started.clone(),
            };
            self.report().await;
            match self.probe_until_exit(pid, stop, &local).await {
                Exit::Stopped => {
                    self.stop_server(pid).await;
                    return;
                }
                Exit::Exited(status) => {
                    processes::stop(pid, Duration::ZERO);
                    let code = status
                        .code()
                        .or_else(|| status.signal().map(|signal| 128 + signal))
                        .unwrap_or(-1);
                    self.shared.note(
                        &self.name,
                        &format!("llama-server exited on its own ({status}); restarting"),
                    );
                    self.observed.restarts += 1;
                    self.observed.last_terminated = Some(Terminated {
                        exit_code: code,
                        reason: if code == 0 { "Completed" } else { "Error" }.into(),
                        started,
                        finished: now(),
                    });
                    self.observed.set_ready(false);
                    self.observed.pid = None;
                    self.shared.update(&self.name, |p| {
                        p.pid = None;
                        p.ready = false;
                        p.paused = false;
                        p.restarts += 1;
                    });
                    // Reported even when the last crash looked the same: the count changed.
                    self.observed.state = State::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: format!("back-off restarting ({status})"),
                    };
                    self.report().await;
                    if running_since.elapsed() > BACKOFF_RESET {
                        backoff = RETRY;
                    }
                    if stopped(stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Probes readiness every [`PROBE_PERIOD`] until the process exits or the pod stops.
    async fn probe_until_exit(
        &mut self,
        pid: u32,
        stop: &mut watch::Receiver<bool>,
        local: &container::LocalContainer,
    ) -> Exit {
        let mut failures = 0;
        let mut refreshed = Instant::now();
        loop {
            if stopped(stop, PROBE_PERIOD).await {
                return Exit::Stopped;
            }
            if let Some(status) = processes::exit_status(pid) {
                return Exit::Exited(status);
            }
            if self.probe().await {
                failures = 0;
                if self.observed.set_ready(true) {
                    self.shared.note(&self.name, "ready");
                    self.report().await;
                }
            } else {
                failures += 1;
                if failures >= FAILURE_THRESHOLD && self.observed.set_ready(false) {
                    self.shared.note(
                        &self.name,
                        &format!("not ready after {failures} failed probes"),
                    );
                    self.report().await;
                }
            }
            self.shared
                .update(&self.name, |p| p.ready = self.observed.ready);
            if refreshed.elapsed() >= REFRESH_PERIOD {
                refreshed = Instant::now();
                if let Err(err) = local
                    .mounts
                    .write(&self.shared.client, &self.shared.namespace)
                    .await
                {
                    self.shared
                        .note(&self.name, &format!("cannot refresh volumes: {err}"));
                }
            }
        }
    }

    async fn probe(&self) -> bool {
        let url = format!("http://{}/health/ready", self.listen);
        self.http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// SIGTERM (the server drains and exits), SIGKILL after the grace period.
    async fn stop_server(&self, pid: u32) {
        if self.shared.pod(&self.name).is_some_and(|p| p.paused) {
            let _ = processes::signal(pid, libc::SIGCONT);
        }
        let grace = self.grace;
        let _ = tokio::task::spawn_blocking(move || processes::stop(pid, grace)).await;
        self.shared
            .note(&self.name, &format!("stopped llama-server (pid {pid})"));
    }

    async fn finish(self) {
        self.shared.unregister(&self.name, &self.fields.uid);
        // The address is free again only once the server is gone.
        drop(self.lease);
    }

    /// Reports the container waiting; a retry that fails the same way reports nothing new.
    async fn waiting(&mut self, reason: &str, message: String) {
        let state = State::Waiting {
            reason: reason.into(),
            message,
        };
        let changed = self.observed.set_ready(false) | (self.observed.state != state);
        if !changed {
            return;
        }
        if let State::Waiting { reason, message } = &state {
            self.shared
                .note(&self.name, &format!("{reason}: {message}"));
        }
        self.observed.state = state;
        self.report().await;
    }

    /// Patches the pod's status; a pod already gone is not an error.
    async fn report(&self) {
        let result = self
            .pods
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(self.observed.patch()),
            )
            .await;
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(err) => self
                .shared
                .note(&self.name, &format!("cannot update the pod status: {err}")),
        }
    }
}

enum Exit {
    Stopped,
    Exited(std::process::ExitStatus),
}

/// Waits `period`; true when the pod is to stop (now or during the wait).
async fn stopped(stop: &mut watch::Receiver<bool>, period: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        changed = stop.changed() => changed.is_err() || *stop.borrow(),
        () = tokio::time::sleep(period) => *stop.borrow(),
    }
}

/// The node's InternalIP (kwok's nodes have 127.0.0.1), as the pod's hostIP.
async fn host_ip(client: &kube::Client, node: &str) -> String {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.status?.addresses)
        .and_then(|a| a.into_iter().find(|a| a.type_ == "InternalIP"))
        .map_or_else(|| "127.0.0.1".to_owned(), |a| a.address)
}
