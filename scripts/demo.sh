#!/usr/bin/env bash
# The local demo: brings up a real Kubernetes control plane with simulated GPU nodes, installs
# the Helm chart (CRDs, ServiceAccount, RBAC, configuration) with a real helm, runs llama-operator
# as the chart's ServiceAccount, applies examples/quickstart.yaml and waits until it is Ready
# (a simulated A100 node, the server pod on it, the endpoint). Then a real llama-server answers a
# chat completion: with the pod runner (root, or the route below), one per pod at the pod's IP,
# called through the Service's EndpointSlice addresses; otherwise a local process configured from
# the deployment's ConfigMap and keys Secret stands in for the pod, whose container kwok does
# not run. Ctrl-C stops everything; --exit stops right after.
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
# Real servers behind the simulated pods (the pod runner) need 10.246.0.0/16 routed to lo:
# root adds it; otherwise it must exist. Without it a local process stands in for the pod.
runner=()
if [ "$(id -u)" = 0 ] || ip route show table local 2>/dev/null | grep -q '^local 10\.246\.0\.0/16 '; then
  runner=(--pod-runner)
  echo "==> the pod runner serves the deployment's pods: a real llama-server per pod, at the pod's IP"
else
  echo "==> no pod runner (needs root, or once: sudo ip route add local 10.246.0.0/16 dev lo);"
  echo "    a local llama-server configured from the deployment stands in for its pod"
fi
exec target/release/dev-cluster --operator target/release/llama-operator \
  --chart charts/llama-operator --server target/release/llama-server "${runner[@]}" \
  --apply examples/quickstart.yaml "$@"
