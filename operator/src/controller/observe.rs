//! From what the cluster shows to the LlamaDeployment's status. Pure.

use super::conditions::{self, MODEL_LOADED, NODE_POOL_READY, READY};
use crate::api::{
    EngineStatus, InstanceCounts, LlamaDeployment, LlamaDeploymentStatus, NodePoolProvider, Phase,
};
use crate::build::{FETCH_CONTAINER, SERVER_CONTAINER};
use crate::validate::{Plan, SpecError};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;

/// What the operator saw of a deployment's children.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Nodes of the current pool that exist and are Ready (kwok pools).
    pub nodes_ready: i32,
    /// Server pods created, and ready.
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Deployment replicas running the current pod template.
    pub updated_replicas: i32,
    /// Why a server pod cannot be scheduled, from the scheduler, if one cannot.
    pub unschedulable: Option<String>,
    /// A server pod is still downloading the weights.
    pub downloading: bool,
    /// The latest progress line of a running download, when its log could be read.
    pub download_progress: Option<DownloadProgress>,
    /// Why a server pod's download failed, when one did (see [`download_failure`]).
    pub download_failed: Option<String>,
    /// Why a server stopped, when one did and no instance is ready (see [`load_failure`]).
    pub load_failed: Option<String>,
    /// Start times of the running server pods.
    pub running_since: Vec<Timestamp>,
    /// Names of the server pods.
    pub pod_names: Vec<String>,
    /// Why Karpenter brings no nodes, when the pool is short of them (Karpenter pools).
    pub pool_problem: Option<super::karpenter_status::PoolProblem>,
}

/// A condition that changed, for an Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// The new status of a valid deployment, and the condition transitions it makes.
pub fn status_for(
    ld: &LlamaDeployment,
    plan: &Plan,
    observed: &Observed,
    endpoint: String,
    selector: String,
    now: Timestamp,
) -> (LlamaDeploymentStatus, Vec<Transition>) {
    let mut status = ld.status.clone().unwrap_or_default();
    let generation = ld.metadata.generation;
    let desired = plan.instances;
    let it = &plan.instance.name;
    let mut transitions = Vec::new();
    let mut set = |conds: &mut Vec<_>, t: &str, ok: bool, reason: &str, message: String| {
        if conditions::set(conds, t, ok, reason, message.clone(), generation, now) {
            transitions.push(Transition {
                type_: t.into(),
                status: ok,
                reason: reason.into(),
                message,
            });
        }
    };

    let short = observed.nodes_ready < desired;
    let (pool_ok, pool_reason, pool_msg) = match (
        &observed.unschedulable,
        plan.provider,
        &observed.pool_problem,
    ) {
        (Some(why), NodePoolProvider::Existing, _) => (
            false,
            "InsufficientCapacity",
            format!(
                "no existing node with instance type {it} and spec.nodePool.nodeSelector has room: {why}"
            ),
        ),
        (_, NodePoolProvider::Karpenter, Some(problem)) if short => {
            (false, problem.reason, problem.message.clone())
        }
        (_, NodePoolProvider::Kwok | NodePoolProvider::Karpenter, _) if short => (
            false,
            "Provisioning",
            format!("{}/{desired} nodes of {it} ready", observed.nodes_ready),
        ),
        (Some(why), _, _) => (
            false,
            "Unschedulable",
            format!("server pods cannot be scheduled: {why}"),
        ),
        _ => (
            true,
            "NodesReady",
            format!("{desired} node(s) of {it} available"),
        ),
    };
    set(
        &mut status.conditions,
        NODE_POOL_READY,
        pool_ok,
        pool_reason,
        pool_msg.clone(),
    );

    let (model_ok, model_reason, model_msg) = if observed.ready_replicas > 0 {
        (
            true,
            "Loaded",
            format!(
                "{} loaded on {} instance(s)",
                ld.spec.model, observed.ready_replicas
            ),
        )
    } else if let Some(why) = &observed.download_failed {
        (
            false,
            "DownloadFailed",
            format!("downloading the model weights failed: {why}"),
        )
    } else if let Some(why) = &observed.load_failed {
        (
            false,
            "LoadFailed",
            format!(
                "llama-server stopped before {} was served: {why}",
                ld.spec.model
            ),
        )
    } else if observed.downloading {
        let message = match &observed.download_progress {
            Some(progress) => format!("downloading the model weights: {progress}"),
            None => "downloading the model weights".to_owned(),
        };
        (false, "Downloading", message)
    } else if observed.replicas > 0 && pool_ok {
        (false, "Loading", format!("loading {}", ld.spec.model))
    } else {
        (
            false,
            "WaitingForNodes",
            "waiting for the node pool".to_owned(),
        )
    };
    set(
        &mut status.conditions,
        MODEL_LOADED,
        model_ok,
        model_reason,
        model_msg.clone(),
    );

    let all_ready =
        desired > 0 && observed.ready_replicas >= desired && observed.updated_replicas >= desired;
    let (ready, reason, message, phase) = if desired == 0 {
        (
            false,
            "ScaledToZero",
            "spec.compute.instanceCount is 0".to_owned(),
            Phase::Pending,
        )
    } else if all_ready {
        (
            true,
            "Ready",
            format!("{desired}/{desired} instances ready at {endpoint}"),
            Phase::Ready,
        )
    } else if !pool_ok {
        (false, pool_reason, pool_msg, Phase::Provisioning)
    } else if !model_ok {
        (false, model_reason, model_msg, Phase::Loading)
    } else {
        (
            false,
            "Progressing",
            format!("{}/{desired} instances ready", observed.ready_replicas),
            Phase::Loading,
        )
    };
    set(&mut status.conditions, READY, ready, reason, message);

    status.phase = Some(phase);
    status.observed_generation = generation;
    status.endpoint = Some(endpoint);
    status.selector = Some(selector);
    status.engine = Some(EngineStatus {
        context_length: i64::try_from(plan.serving.context_length).unwrap_or(i64::MAX),
        kv_cache_tokens: plan
            .serving
            .kv_cache_tokens
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
        kv_cache_gib: plan.serving.kv_cache_gib,
        weights: Some(plan.weights.to_string()),
        weights_gib: Some(crate::serving::round2(plan.model.weights_gib())),
    });
    status.instances = Some(InstanceCounts {
        desired,
        current: observed.replicas,
        ready: observed.ready_replicas,
    });
    (status, transitions)
}

/// The message of a server pod's `fetch-model` init container that exited non-zero and is not
/// running again: stopped, or waiting in CrashLoopBackOff after the failure. The message is the
/// container's termination message (`llama-server fetch` writes its error there).
pub fn download_failure(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let status = pod.status.as_ref()?;
        failure(status.init_container_statuses.as_deref()?, FETCH_CONTAINER)
    })
}

/// The message of a server pod's `llama-server` container that exited non-zero and is not
/// running again, as [`download_failure`]: `serve` writes why it stopped (a model that does not
/// load, a bad configuration); a crash that wrote nothing leaves its log's last lines
/// (`FallbackToLogsOnError`), or the kubelet's reason (`OOMKilled`).
pub fn load_failure(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let status = pod.status.as_ref()?;
        failure(status.container_statuses.as_deref()?, SERVER_CONTAINER)
    })
}

/// How container `name` failed: its termination message (or reason) and exit code, when it
/// exited non-zero and has not started again.
fn failure(statuses: &[ContainerStatus], name: &str) -> Option<String> {
    let container = statuses.iter().find(|c| c.name == name)?;
    let state = container.state.as_ref()?;
    let failed = |t: &Option<ContainerStateTerminated>| {
        t.as_ref().filter(|t| t.exit_code != 0).map(|t| {
            let why = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .or(t.reason.as_deref())
                .unwrap_or("no message");
            format!("{why} (exit code {})", t.exit_code)
        })
    };
    failed(&state.terminated).or_else(|| {
        state
            .waiting
            .as_ref()
            .and_then(|_| failed(&container.last_state.as_ref()?.terminated))
    })
}

/// The first server pod (by name) whose `fetch-model` init container is running.
pub fn downloading_pod(pods: &[Pod]) -> Option<String> {
    let mut names: Vec<String> = pods
        .iter()
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .is_some_and(|inits| {
                    inits.iter().any(|i| {
                        i.name == FETCH_CONTAINER
                            && i.state.as_ref().is_some_and(|st| st.running.is_some())
                    })
                })
        })
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// How far a `llama-server fetch` download has come, from its latest progress line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file being downloaded.
    pub file: String,
    /// Bytes so far, as printed (`1.2 GiB`).
    pub done: String,
    /// The file's size and the percent done, when the server announced a length.
    pub of: Option<(String, u8)>,
}

impl std::fmt::Display for DownloadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.of {
            Some((total, percent)) => {
                write!(f, "{} of {total} ({percent}%) of {}", self.done, self.file)
            }
            None => write!(f, "{} of {} so far", self.done, self.file),
        }
    }
}

/// The most recent progress line in the tail of a `fetch-model` log. `llama-server fetch`
/// (`inference-server/src/fetch/progress.rs`) prints `fetch: FILE DONE / TOTAL (P%), RATE/s`, or
/// `fetch: FILE DONE, RATE/s` when the size is unknown; sizes are `N B` or `N.N KiB|MiB|GiB|TiB`.
/// Other lines (the source, retries, the summary) are skipped.
pub fn parse_download_progress(log: &str) -> Option<DownloadProgress> {
    log.lines().rev().find_map(progress_line)
}

fn progress_line(line: &str) -> Option<DownloadProgress> {
    let rest = line.trim().strip_prefix("fetch: ")?;
    let body = match rest.rsplit_once(", ") {
        Some((body, rate)) if rate.strip_suffix("/s").is_some_and(is_size) => body,
        _ => rest,
    };
    let (head, of) = match body.strip_suffix("%)") {
        Some(with_percent) => {
            let (head, percent) = with_percent.rsplit_once(" (")?;
            let percent: u8 = percent.parse().ok().filter(|p| *p <= 100)?;
            let (head, total) = head.rsplit_once(" / ")?;
            if !is_size(total) {
                return None;
            }
            (head, Some((total.to_owned(), percent)))
        }
        None => (body, None),
    };
    let mut parts = head.rsplitn(3, ' ');
    let unit = parts.next()?;
    let number = parts.next()?;
    let file = parts.next()?.trim();
    let done = format!("{number} {unit}");
    if file.is_empty() || !is_size(&done) {
        return None;
    }
    Some(DownloadProgress {
        file: file.to_owned(),
        done,
        of,
    })
}

/// `1023 B`, `1.5 KiB`, … as `format_bytes` in the fetch code writes them.
fn is_size(text: &str) -> bool {
    let Some((number, unit)) = text.split_once(' ') else {
        return false;
    };
    let number_ok = !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.parse::<f64>().is_ok();
    number_ok && ["B", "KiB", "MiB", "GiB", "TiB"].contains(&unit)
}

/// The status of a deployment whose spec must be fixed: Ready=False with the reason, the rest
/// left as it was.
pub fn status_for_invalid(
    ld: &LlamaDeployment,
    error: &SpecError,
    now: Timestamp,
) -> (LlamaDeploymentStatus, Vec<Transition>) {
    let mut status = ld.status.clone().unwrap_or_default();
    let message = error.to_string();
    let mut transitions = Vec::new();
    if conditions::set(
        &mut status.conditions,
        READY,
        false,
        error.reason(),
        message.clone(),
        ld.metadata.generation,
        now,
    ) {
        transitions.push(Transition {
            type_: READY.into(),
            status: false,
            reason: error.reason().into(),
            message,
        });
    }
    status.phase = Some(Phase::Failed);
    status.observed_generation = ld.metadata.generation;
    (status, transitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).expect("ts")
    }

    fn cond<'a>(s: &'a LlamaDeploymentStatus, t: &str) -> (&'a str, &'a str) {
        let c = conditions::get(&s.conditions, t).expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn provisioning_then_loading_then_ready() {
        let d = ld(CHAT);
        let p = plan(&d);
        let ep = "http://chat.team-a.svc".to_owned();
        let (s, t) = status_for(&d, &p, &Observed::default(), ep.clone(), "x".into(), now());
        assert_eq!(s.phase, Some(Phase::Provisioning));
        assert_eq!(cond(&s, READY), ("False", "Provisioning"));
        assert_eq!(t.len(), 3);

        let mut d2 = d.clone();
        d2.status = Some(s);
        let seen = Observed {
            nodes_ready: 2,
            replicas: 2,
            ..Default::default()
        };
        let (s, _) = status_for(&d2, &p, &seen, ep.clone(), "x".into(), now());
        assert_eq!(s.phase, Some(Phase::Loading));
        assert_eq!(cond(&s, NODE_POOL_READY), ("True", "NodesReady"));
        assert_eq!(cond(&s, MODEL_LOADED), ("False", "Loading"));

        let seen = Observed {
            nodes_ready: 2,
            replicas: 2,
            ready_replicas: 2,
            updated_replicas: 2,
            ..Default::default()
        };
        let (s, t) = status_for(&d2, &p, &seen, ep, "x".into(), now());
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(cond(&s, READY), ("True", "Ready"));
        assert!(t.iter().any(|t| t.type_ == READY && t.status));
        assert_eq!(
            s.instances,
            Some(InstanceCounts {
                desired: 2,
                current: 2,
                ready: 2
            })
        );
        let msg = &conditions::get(&s.conditions, READY)
            .expect("ready")
            .message;
        assert_eq!(msg, "2/2 instances ready at http://chat.team-a.svc");
    }

    #[test]
    fn existing_nodes_without_room_say_so() {
        let d = ld(&CHAT.replace("provider: kwok", "provider: existing"));
        let seen = Observed {
            replicas: 2,
            unschedulable: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
            ..Default::default()
        };
        let (s, _) = status_for(&d, &plan(&d), &seen, "e".into(), "x".into(), now());
        assert_eq!(cond(&s, READY), ("False", "InsufficientCapacity"));
        let msg = &conditions::get(&s.conditions, READY)
            .expect("ready")
            .message;
        assert!(
            msg.contains("Insufficient nvidia.com/gpu") && msg.contains("Standard_NC48ads_A100_v4"),
            "{msg}"
        );
    }
    /// What `llama-server fetch` printed for a URL download, verbatim in form.
    const FETCH_LOG: &str = "\
fetch: https://models.example/Llama-3.1-8B-Q4_K_M.gguf into /models
fetch: Llama-3.1-8B-Q4_K_M.gguf 245.1 MiB / 4.6 GiB (5%), 98.0 MiB/s
fetch: Llama-3.1-8B-Q4_K_M.gguf 1.2 GiB / 4.6 GiB (26%), 101.3 MiB/s
";

    #[test]
    fn the_latest_progress_line_is_parsed() {
        let p = parse_download_progress(FETCH_LOG).expect("progress");
        assert_eq!(
            p,
            DownloadProgress {
                file: "Llama-3.1-8B-Q4_K_M.gguf".into(),
                done: "1.2 GiB".into(),
                of: Some(("4.6 GiB".into(), 26)),
            }
        );
        assert_eq!(
            p.to_string(),
            "1.2 GiB of 4.6 GiB (26%) of Llama-3.1-8B-Q4_K_M.gguf"
        );

        // No length announced; a retry line after it does not hide it.
        let log = "fetch: 4 files from meta-llama/x@main (config.json, model.safetensors)\n\
                   fetch: model.safetensors 512 B, 12.0 KiB/s\n\
                   fetch: error sending request; retrying in 1.0 s (attempt 2/5)\n";
        let p = parse_download_progress(log).expect("progress");
        assert_eq!(p.to_string(), "512 B of model.safetensors so far");

        // Only the source and summary lines, or nothing: no progress.
        for log in [
            "fetch: https://h/m.gguf into /models\n",
            "fetch: done: 1 file(s), 4.6 GiB in 40.2 s from https://h/m.gguf into /models\n",
            "fetch: https://h/m.gguf already in /models, nothing to do\n",
            "fetch: m.gguf 1.2 GiB / 4.6 GiB (260%), 1.0 MiB/s\n",
            "",
        ] {
            assert_eq!(parse_download_progress(log), None, "{log}");
        }
    }

    #[test]
    fn the_log_is_read_from_a_pod_whose_fetch_is_running() {
        let named = |name: &str, state: serde_json::Value| {
            let mut pod = pod_with_fetch(state, serde_json::json!({}));
            pod.metadata.name = Some(name.into());
            pod
        };
        let running = serde_json::json!({"running": {}});
        let pods = [
            named("chat-c", serde_json::json!({"terminated": {"exitCode": 0}})),
            named("chat-b", running.clone()),
            named(
                "chat-a",
                serde_json::json!({"waiting": {"reason": "PodInitializing"}}),
            ),
            named("chat-d", running),
        ];
        assert_eq!(downloading_pod(&pods).as_deref(), Some("chat-b"));
        assert_eq!(downloading_pod(&pods[..1]), None);
        assert_eq!(downloading_pod(&[]), None);
    }

    #[test]
    fn downloading_shows_the_progress_in_model_loaded() {
        let d = ld(CHAT);
        let mut seen = Observed {
            nodes_ready: 2,
            replicas: 2,
            downloading: true,
            download_progress: parse_download_progress(FETCH_LOG),
            ..Default::default()
        };
        let (s, t) = status_for(&d, &plan(&d), &seen, "e".into(), "x".into(), now());
        assert_eq!(cond(&s, MODEL_LOADED), ("False", "Downloading"));
        assert_eq!(cond(&s, READY), ("False", "Downloading"));
        let msg = |s: &LlamaDeploymentStatus, t| {
            conditions::get(&s.conditions, t)
                .expect("condition")
                .message
                .clone()
        };
        assert_eq!(
            msg(&s, MODEL_LOADED),
            "downloading the model weights: 1.2 GiB of 4.6 GiB (26%) of Llama-3.1-8B-Q4_K_M.gguf"
        );
        assert_eq!(msg(&s, READY), msg(&s, MODEL_LOADED));
        assert!(t.iter().any(|t| t.reason == "Downloading"));

        // Further progress changes the message but is no transition (no Event per line).
        let mut d2 = d.clone();
        d2.status = Some(s.clone());
        seen.download_progress = parse_download_progress(&format!(
            "{FETCH_LOG}fetch: Llama-3.1-8B-Q4_K_M.gguf 2.3 GiB / 4.6 GiB (50%), 99.0 MiB/s\n"
        ));
        let (s2, t2) = status_for(&d2, &plan(&d2), &seen, "e".into(), "x".into(), now());
        assert!(msg(&s2, MODEL_LOADED).contains("2.3 GiB of 4.6 GiB (50%)"));
        assert!(t2.is_empty(), "{t2:?}");
        assert_ne!(s2, s);

        // Unreadable log: the plain message.
        seen.download_progress = None;
        let (s3, _) = status_for(&d2, &plan(&d2), &seen, "e".into(), "x".into(), now());
        assert_eq!(msg(&s3, MODEL_LOADED), "downloading the model weights");
    }

    /// A server pod whose container `name`, listed under `statuses` (`containerStatuses` or
    /// `initContainerStatuses`), has `state` and `lastState`.
    fn pod_with(
        statuses: &str,
        name: &str,
        state: serde_json::Value,
        last_state: serde_json::Value,
    ) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-0"},
            "status": {statuses: [{
                "name": name, "image": "llama-server", "imageID": "", "ready": false,
                "restartCount": 1, "state": state, "lastState": last_state,
            }]},
        }))
        .expect("pod")
    }

    /// A server pod whose `fetch-model` init container has `state` and `lastState`.
    fn pod_with_fetch(state: serde_json::Value, last_state: serde_json::Value) -> Pod {
        pod_with("initContainerStatuses", FETCH_CONTAINER, state, last_state)
    }

    #[test]
    fn a_failed_download_shows_its_termination_message() {
        let failed = serde_json::json!({"terminated": {"exitCode": 1, "reason": "Error",
            "message": "sha256 mismatch for https://h/m.gguf: expected aa, got bb\n"}});
        let crash_loop = pod_with_fetch(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            failed.clone(),
        );
        let why = download_failure(&[crash_loop]).expect("a failure");
        assert_eq!(
            why,
            "sha256 mismatch for https://h/m.gguf: expected aa, got bb (exit code 1)"
        );
        let stopped = pod_with_fetch(failed.clone(), serde_json::json!({}));
        assert!(download_failure(&[stopped]).is_some());
        // Retrying after a failure is downloading, and a clean exit is no failure.
        let retrying = pod_with_fetch(serde_json::json!({"running": {}}), failed);
        assert_eq!(download_failure(&[retrying]), None);
        let done = pod_with_fetch(
            serde_json::json!({"terminated": {"exitCode": 0}}),
            serde_json::json!({}),
        );
        assert_eq!(download_failure(&[done]), None);

        let d = ld(CHAT);
        let seen = Observed {
            nodes_ready: 2,
            replicas: 2,
            downloading: true,
            download_failed: Some(why),
            ..Default::default()
        };
        let (s, t) = status_for(&d, &plan(&d), &seen, "e".into(), "x".into(), now());
        assert_eq!(cond(&s, MODEL_LOADED), ("False", "DownloadFailed"));
        assert_eq!(cond(&s, READY), ("False", "DownloadFailed"));
        let msg = &conditions::get(&s.conditions, MODEL_LOADED)
            .expect("model loaded")
            .message;
        assert!(msg.contains("expected aa, got bb"), "{msg}");
        assert!(t.iter().any(|t| t.reason == "DownloadFailed" && !t.status));
    }

    /// A server pod whose `llama-server` container has `state` and `lastState`.
    fn pod_with_server(state: serde_json::Value, last_state: serde_json::Value) -> Pod {
        pod_with("containerStatuses", SERVER_CONTAINER, state, last_state)
    }

    #[test]
    fn a_server_that_stops_shows_why() {
        let failed = serde_json::json!({"terminated": {"exitCode": 1, "reason": "Error",
            "message": "cannot load the model: modelPath /models/x.gguf: no such file or directory"}});
        let crash_loop = pod_with_server(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            failed.clone(),
        );
        let why = load_failure(std::slice::from_ref(&crash_loop)).expect("a failure");
        assert_eq!(
            why,
            "cannot load the model: modelPath /models/x.gguf: no such file or directory (exit code 1)"
        );
        // The download's reader does not take the server's failure for its own.
        assert_eq!(download_failure(&[crash_loop]), None);
        // Killed for memory, with nothing written: the kubelet's reason.
        let oom = pod_with_server(
            serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            serde_json::json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
        );
        assert_eq!(
            load_failure(&[oom]).as_deref(),
            Some("OOMKilled (exit code 137)")
        );
        // Running again after a failure is loading; no status yet is nothing.
        let restarted = pod_with_server(serde_json::json!({"running": {}}), failed);
        assert_eq!(load_failure(&[restarted]), None);
        let fresh: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "chat-1"}}))
                .expect("pod");
        assert_eq!(load_failure(&[fresh]), None);

        let d = ld(CHAT);
        let seen = Observed {
            nodes_ready: 2,
            replicas: 2,
            load_failed: Some(why.clone()),
            ..Default::default()
        };
        let (s, t) = status_for(&d, &plan(&d), &seen, "e".into(), "x".into(), now());
        assert_eq!(cond(&s, MODEL_LOADED), ("False", "LoadFailed"));
        assert_eq!(cond(&s, READY), ("False", "LoadFailed"));
        let msg = &conditions::get(&s.conditions, MODEL_LOADED)
            .expect("model loaded")
            .message;
        assert!(msg.starts_with("llama-server stopped before"), "{msg}");
        assert!(msg.ends_with(&why), "{msg}");
        assert!(t.iter().any(|t| t.reason == "LoadFailed" && !t.status));
        // One instance serving is loaded, whatever another's trouble.
        let seen = Observed {
            ready_replicas: 1,
            ..seen
        };
        let (s, _) = status_for(&d, &plan(&d), &seen, "e".into(), "x".into(), now());
        assert_eq!(cond(&s, MODEL_LOADED), ("True", "Loaded"));
    }
}
