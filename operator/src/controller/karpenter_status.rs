//! Why Karpenter brings no nodes for a pool, from what it writes: its NodePool's conditions, its
//! NodeClaims' `Launched` condition, and its `FailedScheduling` Events on the server pods. Pure.
//!
//! Without this a pool that can never be filled would only say "0/2 nodes ready" — the capacity
//! problem hidden behind a generic message that users of GPU operators complain about.

use serde_json::Value;

/// What stops a Karpenter pool from filling: the `NodePoolReady` reason and message.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolProblem {
    pub reason: &'static str,
    pub message: String,
}

/// The False condition of `type_` in an object's `status.conditions`: (reason, message).
fn false_condition<'a>(object: &'a Value, type_: &str) -> Option<(&'a str, &'a str)> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "False")
        .map(|c| {
            (
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default(),
            )
        })
}

/// The first problem, most specific first:
/// 1. the NodePool is not ready (its node class is missing or not ready, or it failed validation);
/// 2. a NodeClaim could not be launched (no capacity, a cloud error);
/// 3. Karpenter found no way to place a server pod (`failed_scheduling`, the message of its latest
///    `FailedScheduling` Event on one of them).
pub fn pool_problem(
    node_pool_name: &str,
    node_pool: Option<&Value>,
    claims: &[Value],
    failed_scheduling: Option<&str>,
) -> Option<PoolProblem> {
    if let Some(np) = node_pool {
        let specific = [
            "NodeClassReady",
            "ValidationSucceeded",
            "NodeRegistrationHealthy",
        ]
        .iter()
        .find_map(|t| false_condition(np, t).map(|(r, m)| (*t, r, m)));
        if let Some((type_, reason, message)) = specific {
            let hint = if type_ == "NodeClassReady" {
                "; the operator configuration's karpenter.nodeClassGroup, karpenter.nodeClassKind and \
                 karpenter.nodeClassName name the node class every NodePool references: create \
                 it, or point them at one that exists"
            } else {
                ""
            };
            return Some(PoolProblem {
                reason: "NodePoolNotReady",
                message: format!(
                    "Karpenter NodePool {node_pool_name} is not ready: {type_} is False \
                     ({reason}: {message}){hint}"
                ),
            });
        }
        if let Some((reason, message)) = false_condition(np, "Ready") {
            return Some(PoolProblem {
                reason: "NodePoolNotReady",
                message: format!(
                    "Karpenter NodePool {node_pool_name} is not ready ({reason}: {message})"
                ),
            });
        }
    }
    if let Some((reason, message)) = claims.iter().find_map(|c| false_condition(c, "Launched")) {
        return Some(PoolProblem {
            reason: "LaunchFailed",
            message: format!("Karpenter could not launch a node ({reason}): {message}"),
        });
    }
    failed_scheduling.map(|message| PoolProblem {
        reason: "NoMatchingCapacity",
        message: format!(
            "Karpenter has no instance it can launch for the servers: {message}; check that \
             the instance type is offered to Karpenter and that the NodePool's limits allow it"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).expect("yaml")
    }

    #[test]
    fn a_missing_node_class_names_the_configuration_fields() {
        let np = yaml(
            "status:\n  conditions:\n  - {type: ValidationSucceeded, status: 'True', reason: ValidationSucceeded, message: ''}\n  - {type: NodeClassReady, status: 'False', reason: NodeClassNotFound, message: NodeClass not found on cluster}\n  - {type: Ready, status: 'False', reason: UnhealthyDependents, message: NodeClassReady=False}\n",
        );
        let p = pool_problem("llama-a-1", Some(&np), &[], None).expect("problem");
        assert_eq!(p.reason, "NodePoolNotReady");
        assert!(
            p.message.contains(
                "NodeClassReady is False (NodeClassNotFound: NodeClass not found on cluster)"
            ),
            "{}",
            p.message
        );
        assert!(
            p.message.contains("karpenter.nodeClassName"),
            "{}",
            p.message
        );
        assert!(p.message.contains("llama-a-1"), "{}", p.message);
    }

    #[test]
    fn a_failed_launch_comes_before_scheduling_events() {
        let np = yaml("status:\n  conditions:\n  - {type: Ready, status: 'True'}\n");
        let claims = [
            yaml("status:\n  conditions:\n  - {type: Launched, status: 'True'}\n"),
            yaml(
                "status:\n  conditions:\n  - {type: Launched, status: 'False', reason: InsufficientCapacity, message: no capacity in zone}\n",
            ),
        ];
        let p = pool_problem("np", Some(&np), &claims, Some("incompatible")).expect("problem");
        assert_eq!(p.reason, "LaunchFailed");
        assert!(p.message.contains("InsufficientCapacity"), "{}", p.message);
        assert!(p.message.contains("no capacity in zone"), "{}", p.message);
    }

    #[test]
    fn a_scheduling_failure_is_reported_when_nothing_else_is_wrong() {
        let np = yaml("status:\n  conditions:\n  - {type: Ready, status: 'True'}\n");
        let p = pool_problem(
            "np",
            Some(&np),
            &[],
            Some("Failed to schedule pod, no instance type"),
        )
        .expect("problem");
        assert_eq!(p.reason, "NoMatchingCapacity");
        assert!(p.message.contains("no instance type"), "{}", p.message);
    }

    #[test]
    fn a_healthy_pool_has_no_problem() {
        let np = yaml("status:\n  conditions:\n  - {type: Ready, status: 'True'}\n");
        let claims = [yaml(
            "status:\n  conditions:\n  - {type: Launched, status: 'True'}\n",
        )];
        assert_eq!(pool_problem("np", Some(&np), &claims, None), None);
        // A NodePool Karpenter has not looked at yet has no conditions: not a problem.
        assert_eq!(pool_problem("np", Some(&yaml("spec: {}")), &[], None), None);
    }
}
