//! No LlamaDeployment makes the operator's pipeline panic. The example manifests are broken at
//! one to three random places (odd values, dropped fields, unknown fields, values wrapped in
//! arrays), and each is read as the operator reads objects from the API server. Admission
//! validation refuses most of these on a real cluster (tests/tests/api.rs), but an operator must
//! also survive objects written under an older schema. Each object that deserializes then
//! runs through validation. A valid one builds every desired object; an invalid one gets the
//! Ready=False status that the controller writes, with a message. Nothing may panic.
//!
//! Pure functions, no cluster: the same pipeline `reconcile` runs before it applies anything.

use std::panic::{AssertUnwindSafe, catch_unwind};

use json_mutations::{Random, mutate};
use k8s_openapi::jiff::Timestamp;
use llama_operator::api::LlamaDeployment;
use llama_operator::build;
use llama_operator::config::OperatorConfig;
use llama_operator::controller::observe::status_for_invalid;
use llama_operator::validate::{References, validate};
use serde_json::Value;

const CASES: usize = 3_000;

/// Every LlamaDeployment in the repository's examples, as JSON.
fn examples() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
            if value["kind"] == "LlamaDeployment" {
                found.push(value);
            }
        }
    }
    assert!(found.len() >= 5, "examples: {}", found.len());
    found
}

/// What the controller's pipeline did with one object.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Outcome {
    /// The object does not deserialize (the API server's schema refuses it first).
    Unreadable,
    /// Validation refused it: the status says why.
    Invalid,
    /// Valid: every desired object was built.
    Built,
    /// Valid, but a builder refused it: the controller would fail its reconcile and retry.
    /// None may: what validation accepts, the builders build.
    BuildError,
}

fn run(ld: &LlamaDeployment, config: &OperatorConfig, refs: &References) -> Outcome {
    match validate(ld, &config.catalog(), refs) {
        Err(error) => {
            let (status, _) = status_for_invalid(ld, &error, Timestamp::now());
            let ready = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .expect("a Ready condition");
            assert_eq!(ready.status, "False");
            assert!(!ready.message.is_empty(), "{error:?}");
            Outcome::Invalid
        }
        Ok(plan) => {
            let pool = build::pool_id("team-a", "chat", &plan);
            let keys = build::KeyPair {
                primary: "0123456789abcdef0123456789abcdef".into(),
                secondary: "fedcba9876543210fedcba9876543210".into(),
            };
            let built = (|| -> Result<(), build::BuildError> {
                build::server_config_map(ld, &plan)?;
                build::server_deployment(ld, &plan, config, &pool, "hash")?;
                build::server_service(ld)?;
                build::server_pdb(ld)?;
                build::generated_keys_secret(ld, &keys)?;
                build::kwok_node(ld, &plan, &pool, 0)?;
                build::karpenter_node_pool(ld, &plan, &pool, &config.karpenter)?;
                Ok(())
            })();
            match built {
                Ok(()) => Outcome::Built,
                Err(error) => {
                    assert!(!error.to_string().is_empty());
                    Outcome::BuildError
                }
            }
        }
    }
}

#[test]
fn mutated_llama_deployments_never_panic_the_pipeline() {
    let examples = examples();
    let config = OperatorConfig::default();
    let all_present = References {
        auth_secret: Some(Some(vec!["primaryKey".into(), "secondaryKey".into()])),
        token_secret: Some(Some(vec!["token".into()])),
        pvc: Some(true),
    };
    let mut random = Random(0x0be7_a70e_0000_0003);
    let mut outcomes = std::collections::BTreeMap::<Outcome, usize>::new();
    let mut panics = Vec::new();
    for case in 0..CASES {
        let mut doc = examples[case % examples.len()].clone();
        for _ in 0..1 + random.below(3) {
            mutate(&mut doc, &mut random);
        }
        // As the API server returns objects: named, in a namespace, with a uid.
        if let Some(metadata) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
            if metadata
                .get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                metadata.insert("name".into(), "chat".into());
            }
            metadata.insert("namespace".into(), "team-a".into());
            metadata.insert("uid".into(), "0f2d7a4e-0000-4000-8000-000000000003".into());
        }
        let outcome = match serde_json::from_value::<LlamaDeployment>(doc.clone()) {
            Err(_) => Outcome::Unreadable,
            Ok(ld) => {
                let refs = if case % 2 == 0 {
                    References::default()
                } else {
                    all_present.clone()
                };
                match catch_unwind(AssertUnwindSafe(|| run(&ld, &config, &refs))) {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        panics.push(format!("case {case}: {doc}"));
                        continue;
                    }
                }
            }
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    println!("{CASES} mutated LlamaDeployments: {outcomes:?}");
    assert!(panics.is_empty(), "{}", panics.join("\n"));
    assert_eq!(outcomes.get(&Outcome::BuildError), None, "{outcomes:?}");
    // Each path is exercised, or the mutations test less than they seem to.
    for outcome in [Outcome::Unreadable, Outcome::Invalid, Outcome::Built] {
        assert!(
            outcomes.get(&outcome).copied().unwrap_or(0) > CASES / 50,
            "{outcome:?}: {outcomes:?}"
        );
    }
}
