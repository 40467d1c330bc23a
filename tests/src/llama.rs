//! Helpers for tests that drive LlamaDeployments through the real operator.

use crate::{FIELD_MANAGER, OperatorProcess, TestEnv, wait_for};
use kube::api::{Api, Patch, PatchParams};
use llama_operator::api::LlamaDeployment;
use std::time::Duration;

/// Applies (server-side) a LlamaDeployment named `name` in the test's namespace; `spec` is the
/// YAML of its spec, indented by two spaces.
pub async fn apply(env: &TestEnv, name: &str, spec: &str) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    );
    let body: serde_json::Value = serde_yaml::from_str(&yaml)?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// A condition's (status, reason, message).
pub fn condition(ld: &LlamaDeployment, type_: &str) -> Option<(String, String, String)> {
    let c = ld
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the deployment is Ready; the error carries its status and the operator's log.
pub async fn wait_ready(
    env: &TestEnv,
    op: &OperatorProcess,
    name: &str,
    secs: u64,
) -> anyhow::Result<LlamaDeployment> {
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let result = wait_for(Duration::from_secs(secs), || async {
        let ld = api.get(name).await.ok()?;
        (condition(&ld, "Ready")?.0 == "True").then_some(ld)
    })
    .await;
    match result {
        Ok(ld) => Ok(ld),
        Err(e) => {
            let now = api.get(name).await.ok().and_then(|l| l.status);
            anyhow::bail!(
                "{name} not Ready: {e}; status: {now:?}\noperator log:\n{}",
                op.log_text()
            )
        }
    }
}

/// GETs `/metrics` from an operator's metrics address.
pub fn scrape(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}
