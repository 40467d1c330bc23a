//! The Secret holding a deployment's two endpoint keys, when the spec does not reference one.

use super::{BuildError, child_metadata, from_json, name_of};
use crate::api::LlamaDeployment;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;
use std::fmt;

/// The two keys of an endpoint (primary and secondary, so one can be rotated at a time).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub primary: String,
    pub secondary: String,
}

impl fmt::Debug for KeyPair {
    // Keys never reach logs, not even through Debug.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPair { .. }")
    }
}

/// Name of the generated key Secret.
pub fn generated_secret_name(name: &str) -> String {
    format!("{name}-keys")
}

/// The generated key Secret, owned by the deployment.
pub fn generated_keys_secret(ld: &LlamaDeployment, keys: &KeyPair) -> Result<Secret, BuildError> {
    let (name, _) = name_of(ld)?;
    from_json(
        "Secret",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": child_metadata(ld, &generated_secret_name(&name))?,
            "type": "Opaque",
            "stringData": {"primaryKey": keys.primary, "secondaryKey": keys.secondary},
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{CHAT, ld};

    #[test]
    fn secret_holds_both_keys_and_is_owned() {
        let keys = KeyPair {
            primary: "a".repeat(32),
            secondary: "b".repeat(32),
        };
        let secret = generated_keys_secret(&ld(CHAT), &keys).expect("secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-keys"));
        let data = secret.string_data.expect("stringData");
        assert_eq!(data["primaryKey"], keys.primary);
        assert_eq!(data["secondaryKey"], keys.secondary);
        let owner = &secret.metadata.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("LlamaDeployment", "chat")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(format!("{keys:?}"), "KeyPair { .. }");
    }
}
