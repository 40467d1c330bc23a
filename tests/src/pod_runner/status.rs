//! The pod status a kubelet would report for a runner pod, as a strategic-merge patch of the
//! status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::net::IpAddr;

/// The container's current state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Not running: `reason` as a kubelet names it (ContainerCreating,
    /// CreateContainerConfigError, CrashLoopBackOff).
    Waiting { reason: String, message: String },
    /// Running since `since`.
    Running { since: Time },
}

/// How the container last ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub started: Time,
    pub finished: Time,
}

/// What the runner knows of one pod.
#[derive(Debug, Clone)]
pub struct Observed {
    pub pod_ip: IpAddr,
    pub host_ip: String,
    pub started: Time,
    pub container: String,
    pub image: String,
    pub pid: Option<u32>,
    pub state: State,
    pub last_terminated: Option<Terminated>,
    pub restarts: i32,
    pub ready: bool,
    pub ready_changed: Time,
}

/// Now, as the API server stores times (whole seconds).
pub fn now() -> Time {
    Time(Timestamp::now())
}

impl Observed {
    /// A pod that was just taken on: addresses known, container being created, not ready.
    pub fn new(pod_ip: IpAddr, host_ip: String, container: String, image: String) -> Self {
        let started = now();
        Self {
            pod_ip,
            host_ip,
            started: started.clone(),
            container,
            image,
            pid: None,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last_terminated: None,
            restarts: 0,
            ready: false,
            ready_changed: started,
        }
    }

    /// Sets readiness; returns whether it changed (and so needs reporting).
    pub fn set_ready(&mut self, ready: bool) -> bool {
        if self.ready == ready {
            return false;
        }
        self.ready = ready;
        self.ready_changed = now();
        true
    }

    /// The status patch: phase Running, the pod's addresses, conditions and container status.
    pub fn patch(&self) -> Value {
        let ready = if self.ready { "True" } else { "False" };
        let not_ready = |kind: &str| {
            (!self.ready).then(|| {
                (
                    kind.to_owned(),
                    format!("containers with unready status: [{}]", self.container),
                )
            })
        };
        let condition = |type_: &str, status: &str, since: &Time, why: Option<(String, String)>| {
            let (reason, message) = why.unwrap_or_default();
            json!({
                "type": type_,
                "status": status,
                "lastProbeTime": null,
                "lastTransitionTime": since,
                "reason": (!reason.is_empty()).then_some(reason),
                "message": (!message.is_empty()).then_some(message),
            })
        };
        // containerStatuses is an atomic list: the patch replaces it whole.
        let state = match &self.state {
            State::Waiting { reason, message } => json!({
                "waiting": {"reason": reason, "message": (!message.is_empty()).then_some(message)},
            }),
            State::Running { since } => json!({"running": {"startedAt": since}}),
        };
        let last_state = match &self.last_terminated {
            Some(t) => json!({"terminated": {
                "exitCode": t.exit_code,
                "reason": t.reason,
                "startedAt": t.started,
                "finishedAt": t.finished,
            }}),
            None => json!({}),
        };
        let running = matches!(self.state, State::Running { .. });
        json!({
            "status": {
                "phase": "Running",
                "hostIP": self.host_ip,
                "hostIPs": [{"ip": self.host_ip}],
                "podIP": self.pod_ip.to_string(),
                "podIPs": [{"ip": self.pod_ip.to_string()}],
                "startTime": self.started,
                "conditions": [
                    condition("PodReadyToStartContainers", "True", &self.started, None),
                    condition("Initialized", "True", &self.started, None),
                    condition("ContainersReady", ready, &self.ready_changed, not_ready("ContainersNotReady")),
                    condition("Ready", ready, &self.ready_changed, not_ready("ContainersNotReady")),
                ],
                "containerStatuses": [{
                    "name": self.container,
                    "image": self.image,
                    "imageID": "",
                    "containerID": self.pid.map(|pid| format!("llama-pod-runner://{pid}")),
                    "ready": self.ready && running,
                    "started": running,
                    "restartCount": self.restarts,
                    "state": state,
                    "lastState": last_state,
                }],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed::new(
            "10.246.1.1".parse().expect("ip"),
            "127.0.0.1".into(),
            "llama-server".into(),
            "llama-server:dev".into(),
        )
    }

    #[test]
    fn a_new_pod_is_running_with_addresses_but_not_ready() {
        let patch = observed().patch();
        let status = &patch["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.246.1.1");
        assert_eq!(status["podIPs"][0]["ip"], "10.246.1.1");
        assert_eq!(status["hostIP"], "127.0.0.1");
        let ready = &status["conditions"][3];
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "ContainersNotReady");
        let container = &status["containerStatuses"][0];
        assert_eq!(container["ready"], false);
        assert_eq!(container["state"]["waiting"]["reason"], "ContainerCreating");
        assert!(container["state"]["running"].is_null());
    }

    #[test]
    fn readiness_flips_the_conditions_and_the_container() {
        let mut o = observed();
        o.state = State::Running { since: now() };
        o.pid = Some(42);
        assert!(o.set_ready(true));
        assert!(!o.set_ready(true), "no change, nothing to report");
        let patch = o.patch();
        let status = &patch["status"];
        assert_eq!(status["conditions"][2]["status"], "True");
        assert_eq!(status["conditions"][3]["status"], "True");
        assert!(status["conditions"][3]["reason"].is_null());
        let container = &status["containerStatuses"][0];
        assert_eq!(container["ready"], true);
        assert_eq!(container["started"], true);
        assert_eq!(container["containerID"], "llama-pod-runner://42");
        assert!(container["state"]["waiting"].is_null());
        assert!(container["state"]["running"]["startedAt"].is_string());
    }
}
