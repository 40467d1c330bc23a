#!/usr/bin/env bash
# The local demo: brings up a real Kubernetes control plane with simulated GPU nodes, installs
# the CRDs and applies examples/quickstart.yaml. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CONTROL_PLANE_BIN=$(scripts/build-control-plane.sh)
export LLAMA_CONTROL_PLANE_BIN
exec cargo run --quiet --release -p llama-operator-tests --bin dev-cluster -- \
  --apply examples/quickstart.yaml "$@"
