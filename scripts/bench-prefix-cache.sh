#!/usr/bin/env bash
# Time to first token with and without the prefix cache (benches/prefix_cache.py): the release
# llama-server, started once with `engine.prefixCache` on and once off, in the same run, on the
# Llama-3.2-1B-shaped Q4_K_M model, with a chat workload over HTTP. Writes
# docs/benchmarks/prefix-cache.md.
#
#   scripts/bench-prefix-cache.sh
#
# Settings (environment): BENCH_MODEL_DIR (reuse a model generated earlier: a directory with
# model-q4_k_m.gguf and the tokenizer files, e.g. from scripts/bench-vs-llamacpp.sh),
# BENCH_ROUNDS (3), BENCH_RULES (40: the system prompt's length), BENCH_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${BENCH_OUT:-docs/benchmarks/prefix-cache.md}"
# shellcheck source=lib/bench.sh
source scripts/lib/bench.sh

step "setup: tokenizer, Python (httpx), llama-server"
TOKENIZER_DIR=$(scripts/setup-tokenizer.sh)
PYTHON=$(scripts/setup-sdk-venv.sh)
SERVER=$(release_server "$PYTHON")

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bench-prefix-cache.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
MODEL_DIR=$(bench_model "$SCRATCH" "$SERVER" "$TOKENIZER_DIR" 1 q4_k_m)

step "measure"
"$PYTHON" benches/prefix_cache.py --server "$SERVER" --model "$MODEL_DIR/model-q4_k_m.gguf" \
  --tokenizer-dir "$MODEL_DIR" --rounds "${BENCH_ROUNDS:-3}" --rules "${BENCH_RULES:-40}" \
  --out "$OUT"
