//! Real servers behind simulated pods: a stand-in for the kubelet, **on this machine only**.
//!
//! The test cluster's nodes are kwok's, and kwok runs no containers: it marks every pod Ready at
//! once. Pods whose nodeSelector carries [`POD_RUNNER_LABEL`] are left alone by kwok's
//! `pod-ready` stage (see [`crate::kwok_stages`]); a [`PodRunner`] watching their namespace runs
//! them instead, like a kubelet would:
//!
//! - each gets its own address in [`POD_CIDR`], routed to the loopback device of this machine
//!   (adding the route needs root or CAP_NET_ADMIN; it is added once and left in place);
//! - its ConfigMap, Secret and emptyDir volumes are written under a directory of its own, and
//!   its one container runs as a real `llama-server` process with the container's arguments
//!   (in-pod paths rewritten, `--listen` bound to the pod's address) and environment;
//! - its status is the kubelet's: Running with its pod IP at once, Ready only once the server's
//!   `/health/ready` answers 200, unready again after [`FAILURE_THRESHOLD`] failed probes, with
//!   the restart count of a server that exited on its own and was restarted;
//! - when the pod is deleted its server gets SIGTERM (it drains and exits), SIGKILL after the
//!   grace period (capped at 30 s); dropping the runner kills every server at once.
//!
//! The Service's EndpointSlices, kept by the real kube-controller-manager from these pods, then
//! point at real servers. A LlamaDeployment opts in with
//! `nodePool: {provider: kwok, nodeSelector: {llama-operator.io/pod-runner: real}}`.
//!
//! Only pods like the operator's are run: one container running `llama-server` (no `command`),
//! no init containers, and configMap, secret and emptyDir volumes (so `source: {type: demo}`).
//! Anything else stays not Ready with a `CreateContainerConfigError` that says why.

mod container;
mod network;
mod status;
mod supervisor;
mod volumes;

pub(crate) use container::{PodFields, command as server_command, prepare};
pub use network::{NetworkError, POD_CIDR, ensure_local_route};
pub use supervisor::{FAILURE_THRESHOLD, PROBE_PERIOD};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch as signal;
use tokio::task::JoinSet;

/// The node label that hands a pod to the pod runner: pods whose nodeSelector carries it (any
/// value) get a real server.
pub const POD_RUNNER_LABEL: &str = "llama-operator.io/pod-runner";

/// A pod the runner is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerPod {
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's labels (e.g. `llama-operator.io/deployment`).
    pub labels: BTreeMap<String, String>,
    /// Its pod IP, in [`POD_CIDR`].
    pub ip: Ipv4Addr,
    /// The port its server listens on (the container's).
    pub port: u16,
    /// `http://<ip>:<port>`.
    pub endpoint: String,
    /// Its directory (volumes, log).
    pub dir: PathBuf,
    /// The server's output, across restarts.
    pub log: PathBuf,
    /// The server's process id while it runs.
    pub pid: Option<u32>,
    /// Whether the pod is Ready (the last probes succeeded).
    pub ready: bool,
    /// How often the server exited on its own and was restarted.
    pub restarts: i32,
    /// Whether [`PodRunner::pause`] stopped the process.
    pub paused: bool,
}

/// Runs the runner pods of one namespace until dropped. See the module documentation.
pub struct PodRunner {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PodRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRunner")
            .field("namespace", &self.shared.namespace)
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl PodRunner {
    /// Starts running the runner pods of `namespace` with `server_binary` (e.g.
    /// [`crate::local_server::server_binary`]). Fails, saying what is needed, when the pod
    /// addresses cannot be made local to this machine.
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        server_binary: &Path,
    ) -> anyhow::Result<Self> {
        let binary = std::fs::canonicalize(server_binary)
            .with_context(|| format!("llama-server binary {}", server_binary.display()))?;
        let tokenizer_dir = tokio::task::spawn_blocking(|| {
            ensure_local_route()?;
            crate::local_server::tokenizer_dir()
        })
        .await
        .context("pod runner start-up task")?
        .context("pod runner")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let process_dir =
            std::env::temp_dir().join(format!("llama-pod-runner-{}", std::process::id()));
        let dir = process_dir.join(format!("{namespace}-{}", N.fetch_add(1, Ordering::Relaxed)));
        // Shared by every runner of this process: the demo model is generated once.
        let tmpdir = process_dir.join("tmp");
        for d in [&dir, &tmpdir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        crate::processes::remove_at_exit(process_dir);
        let shared = Arc::new(Shared {
            client,
            namespace: namespace.to_owned(),
            binary,
            tokenizer_dir,
            events: dir.join("pod-runner.log"),
            dir,
            tmpdir,
            table: Mutex::new(Table::default()),
        });
        let task = tokio::spawn(watch_pods(Arc::clone(&shared)));
        Ok(Self { shared, task })
    }

    /// The pods the runner has taken on, sorted by name: from the moment it has their address
    /// until their server has stopped (`pid` is set while the server process runs).
    pub fn pods(&self) -> Vec<RunnerPod> {
        self.shared
            .lock()
            .map(|t| t.pods.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Pod `name`, while the runner has it (see [`PodRunner::pods`]).
    pub fn pod(&self, name: &str) -> Option<RunnerPod> {
        self.shared.pod(name)
    }

    /// Stops pod `name`'s server process (SIGSTOP): it keeps its socket but answers nothing, so
    /// its probes fail and, after [`FAILURE_THRESHOLD`] of them, the pod becomes unready.
    pub fn pause(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, libc::SIGSTOP, true)
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, libc::SIGCONT, false)
    }

    /// The runner's directory: one directory per pod, and `pod-runner.log` with what it did.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What the runner did so far (`pod-runner.log`), for failure messages.
    pub fn events(&self) -> String {
        std::fs::read_to_string(&self.shared.events).unwrap_or_default()
    }

    fn signal(&self, name: &str, signal: libc::c_int, paused: bool) -> anyhow::Result<()> {
        let mut table = self
            .shared
            .lock()
            .map_err(|_| anyhow::anyhow!("pod runner table poisoned"))?;
        let pod = table
            .pods
            .get_mut(name)
            .with_context(|| format!("the pod runner runs no pod {name}"))?;
        let pid = pod
            .pid
            .with_context(|| format!("pod {name} has no server process now"))?;
        crate::processes::signal(pid, signal).with_context(|| format!("signal pod {name}"))?;
        pod.paused = paused;
        Ok(())
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.task.abort();
        let pids: Vec<u32> = match self.shared.lock() {
            Ok(mut table) => {
                table.closed = true;
                table.pods.values().filter_map(|p| p.pid).collect()
            }
            Err(_) => Vec::new(),
        };
        for pid in pids {
            crate::processes::stop(pid, std::time::Duration::ZERO);
        }
    }
}

/// What the watcher and the pods' supervisors share.
pub(crate) struct Shared {
    client: kube::Client,
    namespace: String,
    binary: PathBuf,
    tokenizer_dir: PathBuf,
    dir: PathBuf,
    tmpdir: PathBuf,
    events: PathBuf,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    pods: BTreeMap<String, RunnerPod>,
    /// Set when the runner is dropped: no process is started any more.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Table>, ()> {
        self.table.lock().map_err(|_| ())
    }

    fn pod(&self, name: &str) -> Option<RunnerPod> {
        self.lock().ok()?.pods.get(name).cloned()
    }

    fn register(&self, pod: RunnerPod) {
        if let Ok(mut table) = self.lock() {
            table.pods.insert(pod.name.clone(), pod);
        }
    }

    fn unregister(&self, name: &str, uid: &str) {
        if let Ok(mut table) = self.lock()
            && table.pods.get(name).is_some_and(|p| p.uid == uid)
        {
            table.pods.remove(name);
        }
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut RunnerPod)) {
        if let Ok(mut table) = self.lock()
            && let Some(pod) = table.pods.get_mut(name)
        {
            change(pod);
        }
    }

    /// Starts pod `name`'s process with `start` and records its pid, unless the runner is
    /// closed (then `Ok(None)`): a dropped runner never leaves a process behind.
    fn spawn(
        &self,
        name: &str,
        start: impl FnOnce() -> std::io::Result<u32>,
    ) -> std::io::Result<Option<u32>> {
        let mut table = self
            .lock()
            .map_err(|()| std::io::Error::other("pod runner table poisoned"))?;
        if table.closed {
            return Ok(None);
        }
        let pid = start()?;
        if let Some(pod) = table.pods.get_mut(name) {
            pod.pid = Some(pid);
            pod.paused = false;
        }
        Ok(Some(pid))
    }

    /// Appends a line to `pod-runner.log`.
    fn note(&self, pod: &str, what: &str) {
        let line = format!("{} {pod}: {what}\n", status_time());
        if let Ok(mut file) = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.events)
        {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

fn status_time() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Whether the runner runs `pod`: it selects runner nodes and is scheduled.
pub fn is_runner_pod(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.node_name.is_some()
            && s.node_selector
                .as_ref()
                .is_some_and(|n| n.contains_key(POD_RUNNER_LABEL))
    })
}

/// Watches the namespace's pods: starts a supervisor for each new runner pod, stops it when the
/// pod is being deleted or gone.
async fn watch_pods(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &shared.namespace);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // Dropping the set (when this task is aborted) aborts every supervisor.
    let mut supervisors = JoinSet::new();
    let mut stops: HashMap<String, signal::Sender<bool>> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    while let Some(event) = events.next().await {
        while let Some(done) = supervisors.try_join_next() {
            if let Ok(uid) = done {
                stops.remove(&uid);
            }
        }
        let pod = match event {
            Ok(watcher::Event::Init) => {
                listed = Some(HashSet::new());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                // Pods that vanished while the watch was down.
                if let Some(seen) = listed.take() {
                    for (uid, stop) in &stops {
                        if !seen.contains(uid) {
                            let _ = stop.send(true);
                        }
                    }
                }
                continue;
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(stop) = pod.metadata.uid.as_ref().and_then(|u| stops.get(u)) {
                    let _ = stop.send(true);
                }
                continue;
            }
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Err(err) => {
                shared.note("-", &format!("watch error: {err}"));
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        if let Some(seen) = listed.as_mut() {
            seen.insert(uid.clone());
        }
        if !is_runner_pod(&pod) {
            continue;
        }
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if pod.metadata.deletion_timestamp.is_some() || finished {
            if let Some(stop) = stops.get(&uid) {
                let _ = stop.send(true);
            }
            continue;
        }
        if let Entry::Vacant(entry) = stops.entry(uid) {
            let (stop, stopped) = signal::channel(false);
            entry.insert(stop);
            supervisors.spawn(supervisor::run(Arc::clone(&shared), pod, stopped));
        }
    }
}
