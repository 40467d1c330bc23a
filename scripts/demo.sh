#!/usr/bin/env bash
# The local demo: brings up a real Kubernetes control plane with simulated GPU nodes, installs
# the Helm chart (CRDs, ServiceAccount, RBAC, configuration) with a real helm, runs llama-operator
# as the chart's ServiceAccount, applies examples/quickstart.yaml and waits until it is Ready
# (a simulated A100 node, the server pod on it, the endpoint), then starts a real llama-server
# configured from the deployment's ConfigMap and keys Secret (standing in for the pod, whose
# container kwok does not run) and sends it a chat completion. Ctrl-C stops everything;
# --exit stops right after.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
echo "==> building (first run: the control plane takes ~20 min on 2 cores, then it is cached)"
LLAMA_CONTROL_PLANE_BIN=$(scripts/build-control-plane.sh)
export LLAMA_CONTROL_PLANE_BIN
LLAMA_HELM_BIN=$(scripts/build-helm.sh)
export LLAMA_HELM_BIN
LLAMA_TOKENIZER_DIR=$(scripts/setup-tokenizer.sh)
export LLAMA_TOKENIZER_DIR
cargo build --quiet --release -p llama-operator --bin llama-operator -p llama-operator-tests \
  --bin dev-cluster -p llama-server --bin llama-server
echo "==> built ($((SECONDS - t0)) s)"
exec target/release/dev-cluster --operator target/release/llama-operator \
  --chart charts/llama-operator --server target/release/llama-server \
  --apply examples/quickstart.yaml "$@"
