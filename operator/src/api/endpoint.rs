//! `spec.endpoint`: the Service clients call.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Service in front of the instances: the endpoint clients call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// How the Service spreads requests over the instances. `None` (the default): each
    /// connection goes to any instance. `ClientIP`: each client address keeps to one instance
    /// for up to three hours (kube-proxy's session affinity), so that a conversation's next
    /// turn reaches the instance whose prefix cache holds its earlier turns
    /// (`spec.engine.prefixCache`). Choose it when clients call the Service from many addresses
    /// (their own pods); behind a gateway or ingress every request comes from a few addresses,
    /// and it would load one instance with all of them.
    #[serde(default)]
    pub session_affinity: SessionAffinity,
}

/// Kubernetes' session affinity of a Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

impl SessionAffinity {
    /// The Service's `spec.sessionAffinity` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::ClientIp => "ClientIP",
        }
    }
}
