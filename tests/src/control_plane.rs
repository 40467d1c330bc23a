//! A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok (simulated nodes), built by `scripts/build-control-plane.sh`.
//!
//! One control plane per test binary, started on first use and stopped when the binary exits.

use crate::kubeconfig;
use crate::pki::Pki;
use crate::processes;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why the control plane could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("building or locating the control-plane binaries failed: {0}")]
    Binaries(String),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot prepare kwok's stages from {path}: {source}")]
    Stages {
        path: PathBuf,
        source: crate::kwok_stages::StagesError,
    },
    #[error("{name} exited during start-up ({status}); last log lines:\n{log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
    #[error("{name} was not ready after {seconds} s; last log lines:\n{log}")]
    Timeout {
        name: String,
        seconds: u64,
        log: String,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// Directory with certificates, data and logs (removed at exit unless LLAMA_TESTENV_KEEP is set).
    pub dir: PathBuf,
    /// Directory of the control-plane binaries (kubectl included).
    pub bin_dir: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The API server's URL.
    pub server: String,
    /// How long start-up took, binaries already built.
    pub startup: Duration,
}

static PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The control plane of this test binary, started on first call.
    pub fn shared() -> Result<&'static ControlPlane, String> {
        PLANE
            .get_or_init(|| ControlPlane::start().map_err(|err| err.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The `kubectl` built with the control plane, configured for it.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn start() -> Result<ControlPlane, StartError> {
        let bin_dir = binaries()?;
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(format!("llama-testenv-{}", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StartError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        processes::remove_at_exit(dir.clone());
        let pki_dir = dir.join("pki");
        let pki = Pki::generate()?;
        pki.write_server_files(&pki_dir).map_err(io(&pki_dir))?;

        // etcd
        let etcd_port = free_port().map_err(io(&dir))?;
        let peer_port = free_port().map_err(io(&dir))?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bin_dir.join("etcd"));
        etcd.args(["--name", "default", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        let etcd_pid = launch(&dir, "etcd", etcd)?;
        wait_until(&dir, "etcd", etcd_pid, Duration::from_secs(30), || {
            http_get_ok(etcd_port, "/health")
        })?;

        // kube-apiserver
        let api_port = free_port().map_err(io(&dir))?;
        let server = format!("https://127.0.0.1:{api_port}");
        let p = |name: &str| pki_dir.join(name);
        let mut apiserver = Command::new(bin_dir.join("kube-apiserver"));
        apiserver
            .args(["--etcd-servers", &etcd_url])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
            ])
            .args(["--secure-port", &api_port.to_string()])
            .arg("--cert-dir")
            .arg(dir.join("apiserver-certs"))
            .arg("--tls-cert-file")
            .arg(p("apiserver.crt"))
            .arg("--tls-private-key-file")
            .arg(p("apiserver.key"))
            .arg("--client-ca-file")
            .arg(p("ca.crt"))
            .arg("--service-account-key-file")
            .arg(p("sa.pub"))
            .arg("--service-account-signing-key-file")
            .arg(p("sa.key"))
            .args([
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            .args(["--authorization-mode", "Node,RBAC"])
            // As on hardened clusters (OpenShift enables it): changing owner references needs
            // `delete` on the object, and blockOwnerDeletion `update` on the owner's finalizers.
            // The chart's least-privilege RBAC is tested under these stricter rules.
            .args([
                "--enable-admission-plugins",
                "OwnerReferencesPermissionEnforcement",
            ])
            .args(["--allow-privileged=true", "--profiling=false", "--v=0"]);
        let api_pid = launch(&dir, "kube-apiserver", apiserver)?;

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        kubeconfig::write(
            &admin_kubeconfig,
            &server,
            &pki.ca.cert_pem,
            &pki.admin,
            "admin",
        )
        .map_err(io(&admin_kubeconfig))?;
        let kubectl = bin_dir.join("kubectl");
        wait_until(
            &dir,
            "kube-apiserver",
            api_pid,
            Duration::from_secs(60),
            || {
                Command::new(&kubectl)
                    .arg("--kubeconfig")
                    .arg(&admin_kubeconfig)
                    .args(["get", "--raw", "/readyz"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        )?;

        // kube-controller-manager, kube-scheduler and kwok, each with its own identity.
        let component_kubeconfig = |name: &str, cert: &crate::pki::CertAndKey| {
            let path = dir.join(format!("{name}.kubeconfig"));
            kubeconfig::write(&path, &server, &pki.ca.cert_pem, cert, name)
                .map_err(io(&path))
                .map(|()| path)
        };
        let cm_kubeconfig =
            component_kubeconfig("kube-controller-manager", &pki.controller_manager)?;
        let mut cm = Command::new(bin_dir.join("kube-controller-manager"));
        cm.arg("--kubeconfig")
            .arg(&cm_kubeconfig)
            .arg("--service-account-private-key-file")
            .arg(p("sa.key"))
            .arg("--root-ca-file")
            .arg(p("ca.crt"))
            .arg("--cluster-signing-cert-file")
            .arg(p("ca.crt"))
            .arg("--cluster-signing-key-file")
            .arg(p("ca.key"))
            .args([
                "--leader-elect=false",
                "--use-service-account-credentials=true",
            ])
            .args([
                "--secure-port=0",
                "--controllers=*",
                "--concurrent-gc-syncs=5",
            ]);
        let cm_pid = launch(&dir, "kube-controller-manager", cm)?;

        let sched_kubeconfig = component_kubeconfig("kube-scheduler", &pki.scheduler)?;
        let mut sched = Command::new(bin_dir.join("kube-scheduler"));
        sched
            .arg("--kubeconfig")
            .arg(&sched_kubeconfig)
            .args(["--leader-elect=false", "--secure-port=0"]);
        let sched_pid = launch(&dir, "kube-scheduler", sched)?;

        let kwok_kubeconfig = component_kubeconfig("kwok", &pki.kwok)?;
        let stages = write_kwok_stages(&bin_dir.join("kwok-stages.yaml"), &dir)?;
        let mut kwok = Command::new(bin_dir.join("kwok"));
        kwok.arg("--kubeconfig")
            .arg(&kwok_kubeconfig)
            .arg("--config")
            .arg(&stages)
            .args(["--node-lease-duration-seconds=40"])
            .args(["--manage-all-nodes=false"])
            .args(["--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake"])
            .args([
                "--cidr=10.244.0.0/16",
                "--node-ip=127.0.0.1",
                "--server-address=",
            ]);
        let kwok_pid = launch(&dir, "kwok", kwok)?;

        // The components must stay up a moment after start (bad flags exit at once).
        std::thread::sleep(Duration::from_millis(500));
        for (name, pid) in [
            ("kube-controller-manager", cm_pid),
            ("kube-scheduler", sched_pid),
            ("kwok", kwok_pid),
        ] {
            if let Some(status) = processes::exited(pid) {
                return Err(StartError::Exited {
                    name: name.into(),
                    status,
                    log: log_tail(&dir, name),
                });
            }
        }
        let plane = ControlPlane {
            dir,
            bin_dir,
            kubeconfig: admin_kubeconfig,
            server,
            startup: t0.elapsed(),
        };
        eprintln!(
            "testenv: control plane at {} ready in {:.1} s (logs in {})",
            plane.server,
            plane.startup.as_secs_f64(),
            plane.dir.display()
        );
        Ok(plane)
    }
}

/// The directory of the built control-plane binaries: `LLAMA_CONTROL_PLANE_BIN`, or what
/// `scripts/build-control-plane.sh` prints (it builds them on first use and caches them).
pub fn binaries() -> Result<PathBuf, StartError> {
    if let Some(dir) = std::env::var_os("LLAMA_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = workspace_root().join("scripts/build-control-plane.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| StartError::Binaries(format!("cannot run {}: {err}", script.display())))?;
    if !output.status.success() {
        return Err(StartError::Binaries(format!(
            "{} failed ({})",
            script.display(),
            output.status
        )));
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(PathBuf::from(dir))
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn launch(dir: &Path, name: &str, mut command: Command) -> Result<u32, StartError> {
    let log_path = dir.join(format!("{name}.log"));
    let log = File::create(&log_path).map_err(|source| StartError::Io {
        path: log_path.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| StartError::Io {
        path: log_path.clone(),
        source,
    })?;
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    processes::spawn(name, command).map_err(|source| StartError::Spawn {
        name: name.into(),
        source,
    })
}

fn wait_until(
    dir: &Path,
    name: &str,
    pid: u32,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), StartError> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = processes::exited(pid) {
            return Err(StartError::Exited {
                name: name.into(),
                status,
                log: log_tail(dir, name),
            });
        }
        if Instant::now() > deadline {
            return Err(StartError::Timeout {
                name: name.into(),
                seconds: timeout.as_secs(),
                log: log_tail(dir, name),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes into `dir` the stages of `installed` (those the build script installs) with the pod
/// runner's pods left out of `pod-ready` (see [`crate::kwok_stages`]); returns the new file.
fn write_kwok_stages(installed: &Path, dir: &Path) -> Result<PathBuf, StartError> {
    let text = std::fs::read_to_string(installed).map_err(|source| StartError::Io {
        path: installed.to_path_buf(),
        source,
    })?;
    let stages =
        crate::kwok_stages::exclude_runner_pods(&text).map_err(|source| StartError::Stages {
            path: installed.to_path_buf(),
            source,
        })?;
    let path = dir.join("kwok-stages.yaml");
    std::fs::write(&path, stages).map_err(|source| StartError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The last lines of a component's log.
pub fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// A directory a setup script caches and prints (a built tool's bin directory, fetched CRDs):
/// the environment variable `var` when set (`scripts/test.sh` exports them), else what
/// `script` (relative to the workspace) prints on stdout.
pub fn script_dir(var: &str, script: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(var) {
        return Ok(PathBuf::from(dir));
    }
    let script = workspace_root().join(script);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("run {}: {e}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({})",
        script.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}
