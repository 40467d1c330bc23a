//! Reads what a spec refers to (Secrets, PVCs) and the generated keys, before validation.

use crate::api::{LlamaDeployment, SourceType};
use crate::build::{KeyPair, generated_secret_name};
use crate::validate::References;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::{Api, Client};
use rand::Rng;
use rand::distr::Alphanumeric;

const KEY_LEN: usize = 32;

pub async fn references(
    client: &Client,
    ld: &LlamaDeployment,
    ns: &str,
) -> Result<References, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut refs = References::default();
    if let Some(r) = &ld.spec.auth.secret_ref {
        refs.auth_secret = Some(secrets.get_opt(&r.name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, v)| v.0.len() == KEY_LEN)
                .map(|(k, _)| k)
                .collect()
        }));
    }
    if ld.spec.source.type_ == SourceType::HuggingFace
        && let Some(r) = ld
            .spec
            .source
            .hugging_face
            .as_ref()
            .and_then(|h| h.token_secret_ref.as_ref())
    {
        refs.token_secret = Some(secrets.get_opt(&r.name).await?.map(|s| {
            let data = s.data.unwrap_or_default().into_iter();
            let string_data = s.string_data.unwrap_or_default().into_iter();
            data.filter(|(_, v)| !v.0.is_empty())
                .map(|(k, _)| k)
                .chain(string_data.filter(|(_, v)| !v.is_empty()).map(|(k, _)| k))
                .collect()
        }));
    }
    if let Some(pvc) = &ld.spec.source.pvc {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        refs.pvc = Some(pvcs.get_opt(&pvc.claim_name).await?.is_some());
    }
    Ok(refs)
}

/// The keys already in the generated Secret, or two new random ones.
pub async fn generated_keys(client: &Client, ns: &str, name: &str) -> Result<KeyPair, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let existing = secrets.get_opt(&generated_secret_name(name)).await?;
    let read = |key: &str| -> Option<String> {
        let data = existing.as_ref()?.data.as_ref()?;
        let value = String::from_utf8(data.get(key)?.0.clone()).ok()?;
        (value.len() == KEY_LEN).then_some(value)
    };
    Ok(KeyPair {
        primary: read("primaryKey").unwrap_or_else(new_key),
        secondary: read("secondaryKey").unwrap_or_else(new_key),
    })
}

/// A 32-character key from the operating system's CSPRNG-seeded generator.
fn new_key() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(KEY_LEN)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_32_alphanumerics_and_differ() {
        let (a, b) = (super::new_key(), super::new_key());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
