//! The PodDisruptionBudget: voluntary disruptions (drains, upgrades) take one instance at a time.

use super::{BuildError, child_metadata, from_json, name_of, selector_labels};
use crate::api::LlamaDeployment;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::json;

pub fn server_pdb(ld: &LlamaDeployment) -> Result<PodDisruptionBudget, BuildError> {
    let (name, _) = name_of(ld)?;
    from_json(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": child_metadata(ld, &name)?,
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector_labels(&name)},
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld};

    #[test]
    fn one_instance_at_a_time() {
        let pdb = server_pdb(&ld(CHAT)).expect("pdb");
        let spec = pdb.spec.expect("spec");
        assert_eq!(
            spec.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
    }
}
