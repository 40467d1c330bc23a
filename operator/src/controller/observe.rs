//! From what the cluster shows to the LlamaDeployment's status. Pure.

use super::conditions::{self, MODEL_LOADED, NODE_POOL_READY, READY};
use crate::api::{InstanceCounts, LlamaDeployment, LlamaDeploymentStatus, NodePoolProvider, Phase};
use crate::build::FETCH_CONTAINER;
use crate::validate::{Plan, SpecError};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
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
    /// Why a server pod's download failed, when one did (see [`download_failure`]).
    pub download_failed: Option<String>,
    /// Start times of the running server pods.
    pub running_since: Vec<Timestamp>,
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

    let (pool_ok, pool_reason, pool_msg) = match (&observed.unschedulable, plan.provider) {
        (Some(why), NodePoolProvider::Existing) => (
            false,
            "InsufficientCapacity",
            format!(
                "no existing node with instance type {it} and spec.nodePool.nodeSelector has room: {why}"
            ),
        ),
        (_, NodePoolProvider::Kwok | NodePoolProvider::Karpenter)
            if observed.nodes_ready < desired =>
        {
            (
                false,
                "Provisioning",
                format!("{}/{desired} nodes of {it} ready", observed.nodes_ready),
            )
        }
        (Some(why), _) => (
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
    } else if observed.downloading {
        (
            false,
            "Downloading",
            "downloading the model weights".to_owned(),
        )
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
        let fetch = pod
            .status
            .as_ref()?
            .init_container_statuses
            .as_ref()?
            .iter()
            .find(|c| c.name == FETCH_CONTAINER)?;
        let state = fetch.state.as_ref()?;
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
                .and_then(|_| failed(&fetch.last_state.as_ref()?.terminated))
        })
    })
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
    /// A server pod whose `fetch-model` init container has `state` and `lastState`.
    fn pod_with_fetch(state: serde_json::Value, last_state: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-0"},
            "status": {"initContainerStatuses": [{
                "name": FETCH_CONTAINER, "image": "llama-server", "imageID": "", "ready": false,
                "restartCount": 1, "state": state, "lastState": last_state,
            }]},
        }))
        .expect("pod")
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
}
