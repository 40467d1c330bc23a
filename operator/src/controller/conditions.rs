//! Standard `metav1.Condition` bookkeeping.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const NODE_POOL_READY: &str = "NodePoolReady";
pub const MODEL_LOADED: &str = "ModelLoaded";
/// kstatus's "the controller is working towards the spec" (Flux, kpt, Config Sync read it).
pub const RECONCILING: &str = "Reconciling";
/// kstatus's "the controller cannot make progress without a change": Flux fails the health
/// check at once instead of waiting for its timeout.
pub const STALLED: &str = "Stalled";

/// Ready reasons that no retry mends: a spec error, a failed download, a server that stops
/// while loading, missing quota. Each needs a change by someone (the spec, the source, the
/// ComputeQuota or other deployments).
const STALLED_REASONS: [&str; 4] = [
    "DownloadFailed",
    "LoadFailed",
    "QuotaExceeded",
    "InsufficientQuota",
];

/// Derives the kstatus conditions from `Ready` and the phase: `Stalled` True for spec errors
/// (phase `Failed`), failed downloads and loads, and exceeded quota; `Reconciling` True while the
/// deployment is on its way to Ready (provisioning, downloading, loading, progressing); both
/// False when it is Ready or scaled to zero. Their reason and message are Ready's.
pub fn set_kstatus(
    conditions: &mut Vec<Condition>,
    failed_phase: bool,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(ready) = get(conditions, READY).cloned() else {
        return;
    };
    let is_ready = ready.status == "True";
    let stalled = !is_ready && (failed_phase || STALLED_REASONS.contains(&ready.reason.as_str()));
    let reconciling = !is_ready && !stalled && ready.reason != "ScaledToZero";
    for (type_, on) in [(STALLED, stalled), (RECONCILING, reconciling)] {
        set(
            conditions,
            type_,
            on,
            &ready.reason,
            ready.message.clone(),
            generation,
            now,
        );
    }
}

/// Sets condition `type_` in `conditions`, keeping its lastTransitionTime when the status does
/// not change. Returns true when the status changed (a transition worth an Event).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason;
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation: generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// The condition of a type, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of<'a>(conditions: &'a [Condition], type_: &str) -> &'a str {
        get(conditions, type_).map_or("absent", |c| c.status.as_str())
    }

    #[test]
    fn kstatus_conditions_follow_ready() {
        let now = Timestamp::from_second(1_700_000_000).expect("ts");
        let case = |ready: bool, reason: &str, failed: bool| {
            let mut conditions = Vec::new();
            set(
                &mut conditions,
                READY,
                ready,
                reason,
                "m".into(),
                Some(3),
                now,
            );
            set_kstatus(&mut conditions, failed, Some(3), now);
            (
                status_of(&conditions, RECONCILING).to_owned(),
                status_of(&conditions, STALLED).to_owned(),
                get(&conditions, STALLED).map(|c| c.reason.clone()),
            )
        };
        let pair =
            |r: &str, s: &str, reason: &str| (r.to_owned(), s.to_owned(), Some(reason.to_owned()));
        assert_eq!(case(true, "Ready", false), pair("False", "False", "Ready"));
        assert_eq!(
            case(false, "Provisioning", false),
            pair("True", "False", "Provisioning")
        );
        assert_eq!(
            case(false, "Downloading", false),
            pair("True", "False", "Downloading")
        );
        assert_eq!(
            case(false, "InstanceTypeUnknown", true),
            pair("False", "True", "InstanceTypeUnknown")
        );
        assert_eq!(
            case(false, "DownloadFailed", false),
            pair("False", "True", "DownloadFailed")
        );
        assert_eq!(
            case(false, "LoadFailed", false),
            pair("False", "True", "LoadFailed")
        );
        assert_eq!(
            case(false, "QuotaExceeded", false),
            pair("False", "True", "QuotaExceeded")
        );
        assert_eq!(
            case(false, "ScaledToZero", false),
            pair("False", "False", "ScaledToZero")
        );
        // Without Ready (nothing observed yet) nothing is derived.
        let mut none = Vec::new();
        set_kstatus(&mut none, false, Some(1), now);
        assert!(none.is_empty());
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = Timestamp::from_second(1_000).expect("ts");
        let t1 = Timestamp::from_second(2_000).expect("ts");
        let mut list = Vec::new();
        assert!(set(
            &mut list,
            READY,
            false,
            "Provisioning",
            "a".into(),
            Some(1),
            t0
        ));
        assert!(!set(
            &mut list,
            READY,
            false,
            "Provisioning",
            "b".into(),
            Some(2),
            t1
        ));
        assert_eq!(list[0].last_transition_time, Time(t0));
        assert_eq!(list[0].message, "b");
        assert!(set(
            &mut list,
            READY,
            true,
            "Ready",
            "c".into(),
            Some(2),
            t1
        ));
        assert_eq!(list[0].last_transition_time, Time(t1));
    }
}
