#!/usr/bin/env bash
# Records the autoscaling trace (operator/benches/autoscaling_trace.rs): a step of real load
# against real servers behind the test cluster's simulated pods; writes
# docs/benchmarks/autoscaling-trace.csv and docs/benchmarks/autoscaling.md, then plots
# docs/benchmarks/autoscaling-trace.png with matplotlib from a cached environment.
# Needs what the tests need (scripts/build-control-plane.sh, the tokenizer) and root for the pod
# runner's local pod addresses.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
CACHE="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
PACKAGES=(matplotlib==3.10.8)
HASH=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)
VENV="$CACHE/plot-venv-$HASH"
if ! "$VENV/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
  echo "bench-autoscaling: installing ${PACKAGES[*]} into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
fi
LLAMA_CONTROL_PLANE_BIN=$(scripts/build-control-plane.sh)
export LLAMA_CONTROL_PLANE_BIN
LLAMA_TOKENIZER_DIR=$(scripts/setup-tokenizer.sh)
export LLAMA_TOKENIZER_DIR
# The servers and the load generator as a user would run them: release builds.
cargo build --release -p llama-server --bins
export LLAMA_SERVER_BIN="$root/target/release/llama-server" LLAMA_LOAD_BIN="$root/target/release/llama-load"
cargo bench -p llama-operator --bench autoscaling_trace
"$VENV/bin/python" scripts/plot-autoscaling-trace.py docs/benchmarks/autoscaling-trace.csv docs/benchmarks/autoscaling-trace.png
echo "bench-autoscaling: wrote docs/benchmarks/autoscaling.md, autoscaling-trace.csv and autoscaling-trace.png"
