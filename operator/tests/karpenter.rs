//! The Karpenter provider against Karpenter's published CRDs (karpenter.sh/v1 NodePool): the API
//! server validates the NodePool the operator writes; a missing Karpenter is reported.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use llama_operator::api::LlamaDeployment;
use llama_operator::build::karpenter_node_pool_resource;
use std::path::Path;
use std::time::Duration;
use testenv::{FIELD_MANAGER, OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

fn reason(ld: &LlamaDeployment, type_: &str) -> Option<(String, String)> {
    testenv::llama::condition(ld, type_).map(|(_, reason, message)| (reason, message))
}

#[tokio::test]
async fn karpenter_node_pool_is_written_validated_and_released() -> anyhow::Result<()> {
    let env = TestEnv::new("karpenter").await?;
    env.install_crds().await?;
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &[])?;
    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let body: serde_json::Value = serde_yaml::from_str(
        "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {name: kp}\nspec:\n  model: Meta-Llama-3.1-8B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Standard_NC40ads_H100_v5, instanceCount: 2}\n  nodePool: {provider: karpenter}\n",
    )?;
    api.patch(
        "kp",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;

    // Without Karpenter the deployment says so.
    let (_, message) = wait_for(Duration::from_secs(30), || async {
        reason(&api.get("kp").await.ok()?, "Ready").filter(|r| r.0 == "NodePoolProviderUnavailable")
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePoolProviderUnavailable: {e}\n{}", op.log_text()))?;
    assert!(
        message.contains("karpenter.sh/v1 NodePool API is not installed"),
        "{message}"
    );

    // With Karpenter's CRDs, the NodePool is accepted by the API server's schema validation.
    let names = testenv::install_crds_from(&env.client, &testenv::karpenter_crds_dir()?).await?;
    assert!(
        names.contains(&"nodepools.karpenter.sh".to_owned()),
        "{names:?}"
    );
    // Any change of the LlamaDeployment triggers a new reconcile at once.
    let touch = serde_json::json!({"metadata": {"annotations": {"test/touch": "1"}}});
    api.patch("kp", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    let pools: Api<DynamicObject> =
        Api::all_with(env.client.clone(), &karpenter_node_pool_resource());
    let selector = format!(
        "llama-operator.io/deployment-namespace={},llama-operator.io/deployment=kp",
        env.namespace
    );
    let pool = wait_for(Duration::from_secs(30), || async {
        pools
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await
    .map_err(|e| anyhow::anyhow!("no NodePool: {e}\n{}", op.log_text()))?;
    let spec = &pool.data["spec"];
    assert_eq!(
        spec["template"]["spec"]["requirements"][0]["values"][0],
        "Standard_NC40ads_H100_v5"
    );
    assert_eq!(spec["limits"]["cpu"], "80");
    assert_eq!(spec["limits"]["nvidia.com/gpu"], "2");
    // The API server defaulted fields of its own schema: proof it was validated as a NodePool.
    assert!(spec["disruption"]["budgets"].is_array(), "{spec}");
    // Until Karpenter brings nodes, the pool is provisioning.
    let (r, _) = wait_for(Duration::from_secs(30), || async {
        reason(&api.get("kp").await.ok()?, "NodePoolReady").filter(|r| r.0 == "Provisioning")
    })
    .await?;
    assert_eq!(r, "Provisioning");

    api.delete("kp", &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(30), || async {
        let gone = api.get_opt("kp").await.ok()?.is_none();
        let pools_gone = pools
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .ok()?
            .items
            .is_empty();
        (gone && pools_gone).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("NodePool not released: {e}\n{}", op.log_text()))?;
    Ok(())
}
