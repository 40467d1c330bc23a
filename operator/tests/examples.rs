//! Every manifest in examples/ is accepted by the real API server with the CRDs installed
//! (server-side dry run: the OpenAPI schema and the CEL rules judge it, nothing is stored).

use std::path::Path;

use testenv::TestEnv;

#[tokio::test]
async fn every_example_passes_server_side_dry_run() -> anyhow::Result<()> {
    let env = TestEnv::new("examples").await?;
    env.install_crds().await?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples: {files:?}");
    let mut kinds = Vec::new();
    for file in &files {
        let path = file.display().to_string();
        // Applied in the test's namespace (a manifest naming `default` is moved there).
        let text = std::fs::read_to_string(file)?.replace(
            "namespace: default",
            &format!("namespace: {}", env.namespace),
        );
        let out = env.run_kubectl(
            &["apply", "--dry-run=server", "--server-side", "-f", "-"],
            Some(&text),
        )?;
        assert!(out.success, "{path} rejected:\n{}", out.stderr);
        kinds.extend(out.stdout.lines().map(str::to_owned));
    }
    let all = kinds.join("\n");
    for model_object in [
        "llama-405b",
        "llama-70b",
        "llama-70b-q4",
        "llama-guard",
        "trial",
        "chat-managed-keys",
    ] {
        assert!(
            all.contains(model_object),
            "{model_object} not applied:\n{all}"
        );
    }
    assert!(
        all.contains("computequota.llama-operator.io/default"),
        "{all}"
    );
    Ok(())
}
