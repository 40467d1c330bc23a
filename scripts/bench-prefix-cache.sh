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
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)" >&2; }

step "setup: tokenizer, Python (httpx), llama-server"
TOKENIZER_DIR=$(scripts/setup-tokenizer.sh)
PYTHON=$(scripts/setup-sdk-venv.sh)
cargo build --release --locked -p llama-server >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
SERVER="$TARGET_DIR/release/llama-server"

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/bench-prefix-cache.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
if [[ -n "${BENCH_MODEL_DIR:-}" ]]; then
  MODEL_DIR="$BENCH_MODEL_DIR"
else
  MODEL_DIR="$SCRATCH/model"
  step "generate-model: llama-3.2-1b, Q4_K_M"
  "$SERVER" generate-model --shape llama-3.2-1b --seed 1 --dtype bf16 \
    --tokenizer-dir "$TOKENIZER_DIR" --out "$MODEL_DIR" --gguf q4_k_m >&2
  rm -f "$MODEL_DIR/model.safetensors"
fi

step "measure"
"$PYTHON" benches/prefix_cache.py --server "$SERVER" --model "$MODEL_DIR/model-q4_k_m.gguf" \
  --tokenizer-dir "$MODEL_DIR" --rounds "${BENCH_ROUNDS:-3}" --rules "${BENCH_RULES:-40}" \
  --out "$OUT"
