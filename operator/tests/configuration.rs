//! The operator configuration (a mounted ConfigMap in a cluster) is re-read without a restart.

use kube::api::{Api, Patch, PatchParams};
use llama_operator::api::LlamaDeployment;
use std::path::Path;
use std::time::Duration;
use testenv::{FIELD_MANAGER, OperatorProcess, TestEnv, wait_for};

const OPERATOR: &str = env!("CARGO_BIN_EXE_llama-operator");

#[tokio::test]
async fn a_new_instance_type_in_the_configuration_takes_effect_without_restart()
-> anyhow::Result<()> {
    let env = TestEnv::new("config-reload").await?;
    env.install_crds().await?;
    let config = env
        .plane
        .dir
        .join(format!("{}-operator.yaml", env.namespace));
    std::fs::write(&config, "surgeFactor: 1.2\n")?;
    let config_arg = config.to_string_lossy().into_owned();
    let op = OperatorProcess::start(&env, Path::new(OPERATOR), &["--config", &config_arg])?;

    let api: Api<LlamaDeployment> = Api::namespaced(env.client.clone(), &env.namespace);
    let body: serde_json::Value = serde_yaml::from_str(
        "apiVersion: llama-operator.io/v1alpha1\nkind: LlamaDeployment\nmetadata: {name: l40s}\nspec:\n  model: Meta-Llama-3.2-3B-Instruct\n  source: {type: demo}\n  compute: {instanceType: Custom_L40S}\n  nodePool: {provider: kwok}\n",
    )?;
    api.patch(
        "l40s",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    let reason = |ld: LlamaDeployment| {
        ld.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status, c.reason))
    };
    wait_for(Duration::from_secs(30), || async {
        reason(api.get("l40s").await.ok()?).filter(|r| r.1 == "InstanceTypeUnknown")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.log_text()))?;

    // A broken edit is ignored (and logged); the previous configuration stays in force.
    std::fs::write(&config, "surgeFactor: [oops\n")?;
    wait_for(Duration::from_secs(20), || async {
        op.log_text()
            .contains("configuration change ignored")
            .then_some(())
    })
    .await?;

    std::fs::write(
        &config,
        "instanceTypes:\n- {name: Custom_L40S, family: CustomL40SFamily, cores: 16, memoryGib: 128, gpuType: L40S-48GB, gpuCount: 1, gpuMemoryGib: 48, hourlyPrice: 1.9, currency: USD}\n",
    )?;
    wait_for(Duration::from_secs(60), || async {
        reason(api.get("l40s").await.ok()?).filter(|r| r.0 == "True")
    })
    .await
    .map_err(|e| anyhow::anyhow!("not Ready after reload: {e}\n{}", op.log_text()))?;
    assert!(op.log_text().contains("configuration reloaded"));
    Ok(())
}
