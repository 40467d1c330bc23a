//! Standard `metav1.Condition` bookkeeping.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const NODE_POOL_READY: &str = "NodePoolReady";
pub const MODEL_LOADED: &str = "ModelLoaded";

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
