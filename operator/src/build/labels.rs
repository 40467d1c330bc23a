//! Labels, selectors and the node-pool identity shared by the built objects.

use crate::api::LlamaDeployment;
use crate::validate::Plan;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Node label (and taint key) naming the pool a node belongs to.
pub const POOL_LABEL: &str = "llama-operator.io/pool";
/// Taint key that keeps other workloads off a pool's nodes.
pub const POOL_TAINT: &str = POOL_LABEL;
/// Node label: namespace of the owning LlamaDeployment.
pub const DEPLOYMENT_NAMESPACE_LABEL: &str = "llama-operator.io/deployment-namespace";
/// Label: name of the owning LlamaDeployment.
pub const DEPLOYMENT_NAME_LABEL: &str = "llama-operator.io/deployment";

/// The pool of a deployment on an instance type: a short, stable id usable in names and labels.
/// A new instance type means a new pool.
pub fn pool_id(namespace: &str, name: &str, plan: &Plan) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}/{}", plan.instance.name));
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{name}-{hex}")
}

/// Labels that select the server pods of a deployment (stable across updates).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "llama-server".to_owned(),
        ),
        (DEPLOYMENT_NAME_LABEL.to_owned(), name.to_owned()),
    ])
}

/// The selector as a string, for the scale subresource.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every object built for a deployment.
pub fn pod_labels(ld: &LlamaDeployment, name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert("app.kubernetes.io/instance".into(), name.to_owned());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "llama-operator".into(),
    );
    labels.insert(
        "app.kubernetes.io/component".into(),
        "inference-server".into(),
    );
    labels.insert(
        "llama-operator.io/model".into(),
        ld.spec.model.to_string().replace('.', "-"),
    );
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld, plan};

    #[test]
    fn pool_id_is_stable_and_changes_with_instance_type() {
        let d = ld(CHAT);
        let p = plan(&d);
        let a = pool_id("team-a", "chat", &p);
        assert_eq!(a, pool_id("team-a", "chat", &p));
        assert!(
            a.starts_with("chat-") && a.len() == "chat-".len() + 10,
            "{a}"
        );
        let other = plan(&ld(
            &CHAT.replace("Standard_NC48ads_A100_v4", "Standard_NC24ads_A100_v4")
        ));
        assert_ne!(a, pool_id("team-a", "chat", &other));
        assert_ne!(a, pool_id("team-b", "chat", &p));
    }

    #[test]
    fn selector_string_is_sorted_key_value_pairs() {
        assert_eq!(
            selector_string("chat"),
            "app.kubernetes.io/name=llama-server,llama-operator.io/deployment=chat"
        );
    }
}
