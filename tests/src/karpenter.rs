//! Real Karpenter (`sigs.k8s.io/karpenter`, its kwok cloud provider) against the test control
//! plane: built by `scripts/build-karpenter.sh`, its CRDs fetched by
//! `scripts/fetch-karpenter-crds.sh`. Karpenter watches pending pods, launches NodeClaims for the
//! NodePools that fit them, and creates their Nodes, which the plane's kwok then runs.

use crate::{TestEnv, control_plane, processes};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Karpenter's published CRDs (NodePool, NodeClaim, NodeOverlay, KWOKNodeClass):
/// `LLAMA_KARPENTER_CRDS`, or what `scripts/fetch-karpenter-crds.sh` prints.
pub fn crds_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir("LLAMA_KARPENTER_CRDS", "scripts/fetch-karpenter-crds.sh")
}

/// The directory of the built `karpenter-kwok`: `LLAMA_KARPENTER_BIN`, or what
/// `scripts/build-karpenter.sh` prints.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    control_plane::script_dir("LLAMA_KARPENTER_BIN", "scripts/build-karpenter.sh")
}

/// One instance type Karpenter's kwok provider may launch (an entry of its instance-types file).
pub struct InstanceType<'a> {
    pub name: &'a str,
    pub cpu: u32,
    pub memory_gib: u32,
    pub gpus: u32,
    pub hourly_price: f64,
}

/// The zone every offering of [`instance_types_json`] is in.
pub const ZONE: &str = "test-zone-a";

/// Karpenter's kwok instance-types file for `types`: each offered on demand in [`ZONE`], with
/// `nvidia.com/gpu` capacity.
pub fn instance_types_json(types: &[InstanceType<'_>]) -> serde_json::Value {
    let entries: Vec<_> = types
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "architecture": "amd64",
                "operatingSystems": ["linux"],
                "resources": {
                    "cpu": t.cpu.to_string(),
                    "memory": format!("{}Gi", t.memory_gib),
                    "nvidia.com/gpu": t.gpus.to_string(),
                    "pods": "110",
                },
                "offerings": [{
                    "Price": t.hourly_price,
                    "Available": true,
                    "Requirements": [
                        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [ZONE]},
                    ],
                }],
            })
        })
        .collect();
    serde_json::Value::Array(entries)
}

/// A running Karpenter; stopped when dropped.
pub struct KarpenterProcess {
    pid: u32,
    pub log: PathBuf,
}

impl KarpenterProcess {
    /// Starts Karpenter with the admin kubeconfig, offering `instance_types` (see
    /// [`instance_types_json`]). Leader election is off (one replica); its metrics and health
    /// ports are picked by the kernel, so several test binaries can run one each.
    pub fn start(env: &TestEnv, instance_types: &serde_json::Value) -> anyhow::Result<Self> {
        let dir = &env.plane.dir;
        let types = dir.join(format!("karpenter-instance-types-{}.json", env.namespace));
        std::fs::write(&types, serde_json::to_vec_pretty(instance_types)?)?;
        let log = dir.join(format!("karpenter-{}.log", env.namespace));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin_dir()?.join("karpenter-kwok"));
        cmd.env("KUBECONFIG", &env.plane.kubeconfig)
            .env("INSTANCE_TYPES_FILE_PATH", &types)
            .env("DISABLE_LEADER_ELECTION", "true")
            .env("METRICS_PORT", "0")
            .env("HEALTH_PROBE_PORT", "0")
            .env("SYSTEM_NAMESPACE", &env.namespace)
            // Decide on pending pods after 1 s of quiet (at most 3 s), not the default 10 s.
            .env("BATCH_IDLE_DURATION", "1s")
            .env("BATCH_MAX_DURATION", "3s")
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let pid = processes::spawn("karpenter", cmd)?;
        Ok(Self { pid, log })
    }

    /// Karpenter's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for KarpenterProcess {
    fn drop(&mut self) {
        processes::stop(self.pid, Duration::from_secs(5));
    }
}
