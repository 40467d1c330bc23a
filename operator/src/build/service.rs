//! The Service in front of a deployment's servers: its endpoint.

use super::{BuildError, child_metadata, from_json, name_of, selector_labels};
use crate::api::LlamaDeployment;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;

/// The in-cluster URL clients use.
pub fn endpoint_url(name: &str, namespace: &str) -> String {
    format!("http://{name}.{namespace}.svc")
}

/// A ClusterIP Service on port 80 → the servers' `http` port.
pub fn server_service(ld: &LlamaDeployment) -> Result<Service, BuildError> {
    let (name, _) = name_of(ld)?;
    from_json(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": child_metadata(ld, &name)?,
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(&name),
                "sessionAffinity": ld.spec.endpoint.session_affinity.as_str(),
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld};

    #[test]
    fn service_selects_the_servers_on_port_80() {
        let svc = server_service(&ld(CHAT)).expect("service");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.selector, Some(selector_labels("chat")));
        assert_eq!(spec.ports.expect("ports")[0].port, 80);
        assert_eq!(endpoint_url("chat", "team-a"), "http://chat.team-a.svc");
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    }

    #[test]
    fn client_ip_affinity_keeps_each_client_on_one_instance() {
        let d = ld(&format!(
            "{CHAT}  endpoint: {{sessionAffinity: ClientIP}}\n"
        ));
        let spec = server_service(&d).expect("service").spec.expect("spec");
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    }
}
