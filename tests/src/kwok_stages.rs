//! kwok's stages as the test control plane runs them: those `scripts/build-control-plane.sh`
//! installs, with the pods of the pod runner left out of `pod-ready`.
//!
//! kwok marks every pod on its nodes Ready at once. Pods that select nodes labelled
//! [`POD_RUNNER_LABEL`] get a real `llama-server` from [`crate::pod_runner`] instead, and are
//! Ready only when that server is; kwok still deletes them (its `pod-delete` stage).

use crate::pod_runner::POD_RUNNER_LABEL;
use serde::Deserialize as _;
use serde_yaml::Value;

/// Name of kwok's stage that makes pods Running and Ready.
pub const POD_READY_STAGE: &str = "pod-ready";

/// Why the stages could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum StagesError {
    #[error("the stages are not YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("no Stage named {POD_READY_STAGE}")]
    NoPodReadyStage,
    #[error("Stage {POD_READY_STAGE} has no spec.selector mapping")]
    Malformed,
}

/// The jq query kwok evaluates on a pod: the runner label of its nodeSelector (null when absent).
pub fn runner_label_query() -> String {
    format!(".spec.nodeSelector[\"{POD_RUNNER_LABEL}\"]")
}

/// `stages` (kwok's multi-document Stage YAML) with the `pod-ready` stage restricted to pods
/// whose nodeSelector does not carry [`POD_RUNNER_LABEL`]. Every other document is kept as it
/// was (re-serialized); applying it twice changes nothing more.
pub fn exclude_runner_pods(stages: &str) -> Result<String, StagesError> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(stages) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    let pod_ready = documents
        .iter_mut()
        .find(|d| d["kind"] == "Stage" && d["metadata"]["name"] == POD_READY_STAGE)
        .ok_or(StagesError::NoPodReadyStage)?;
    let selector = pod_ready
        .get_mut("spec")
        .and_then(|spec| spec.get_mut("selector"))
        .and_then(Value::as_mapping_mut)
        .ok_or(StagesError::Malformed)?;
    let expressions = selector
        .entry(Value::from("matchExpressions"))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    let expressions = expressions
        .as_sequence_mut()
        .ok_or(StagesError::Malformed)?;
    let query = runner_label_query();
    if !expressions.iter().any(|e| e["key"] == query.as_str()) {
        let mut expression = serde_yaml::Mapping::new();
        expression.insert("key".into(), query.into());
        expression.insert("operator".into(), "DoesNotExist".into());
        expressions.push(Value::Mapping(expression));
    }
    let mut out = String::new();
    for document in &documents {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(document)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two pod stages as kwok v0.8.0 ships them (templates shortened).
    const STAGES: &str = r#"---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values:
      - 'Pending'
  next:
    statusTemplate: |
      {{ $now := Now }}

      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"#;

    fn documents(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).expect("yaml"))
            .filter(|v| !v.is_null())
            .collect()
    }

    #[test]
    fn pod_ready_leaves_out_pods_that_select_runner_nodes() {
        let out = exclude_runner_pods(STAGES).expect("rewrite");
        let before = documents(STAGES);
        let after = documents(&out);
        assert_eq!(after.len(), 2);
        let expressions = after[0]["spec"]["selector"]["matchExpressions"]
            .as_sequence()
            .expect("expressions");
        assert_eq!(expressions.len(), 3);
        assert_eq!(
            expressions[2]["key"],
            ".spec.nodeSelector[\"llama-operator.io/pod-runner\"]"
        );
        assert_eq!(expressions[2]["operator"], "DoesNotExist");
        assert!(expressions[2].get("values").is_none());
        // The existing expressions and the status template are untouched.
        assert_eq!(
            expressions[..2],
            before[0]["spec"]["selector"]["matchExpressions"]
                .as_sequence()
                .expect("expressions")[..]
        );
        assert_eq!(after[0]["spec"]["next"], before[0]["spec"]["next"]);
        // pod-delete still deletes every pod, the runner's included.
        assert_eq!(after[1], before[1]);
    }

    #[test]
    fn rewriting_twice_adds_the_expression_once() {
        let once = exclude_runner_pods(STAGES).expect("once");
        let twice = exclude_runner_pods(&once).expect("twice");
        assert_eq!(documents(&once), documents(&twice));
    }

    #[test]
    fn a_missing_pod_ready_stage_is_an_error() {
        let without: String = STAGES
            .split("---\n")
            .filter(|d| !d.contains("name: pod-ready"))
            .collect::<Vec<_>>()
            .join("---\n");
        assert!(matches!(
            exclude_runner_pods(&without),
            Err(StagesError::NoPodReadyStage)
        ));
    }
}
