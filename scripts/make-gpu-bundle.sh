#!/usr/bin/env bash
# Assembles what a GPU host needs to check llama-server's CUDA build (docs/gpu.md) into one
# directory and a tarball beside it, and prints the tarball's path:
#
#   scripts/make-gpu-bundle.sh [--binary PATH] [OUT_DIR]
#
#   OUT_DIR/ (default target/gpu-bundle/llama-server-gpu-bundle)
#     llama-server            the CUDA release binary (scripts/build-cuda.sh, unless --binary),
#                             debug line tables stripped
#     tokenizer/              tokenizer.json, tokenizer_config.json (scripts/setup-tokenizer.sh)
#     goldens/                inference-server/tests/goldens/*.json
#     scripts/gpu-check.sh    the one-command check, and scripts/gpu/gpu_check.py beside it
#     README.md               docs/gpu.md
#     MANIFEST                commit, build settings, libraries needed, sha256 of every file
#   OUT_DIR.tar.gz
#
# On the GPU host: tar xzf llama-server-gpu-bundle.tar.gz && llama-server-gpu-bundle/scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
if [ "${1:-}" = --binary ]; then
  binary=${2:?--binary needs a path}
  shift 2
fi
out=${1:-target/gpu-bundle/llama-server-gpu-bundle}
log() { echo "make-gpu-bundle: $*" >&2; }

if [ -z "$binary" ]; then
  binary=$(scripts/build-cuda.sh)
fi
[ -x "$binary" ] || { echo "make-gpu-bundle: no binary at $binary" >&2; exit 1; }
tokenizer=$(scripts/setup-tokenizer.sh)

rm -rf "$out"
mkdir -p "$out/tokenizer" "$out/goldens" "$out/scripts/gpu"
# Without the line tables (161 MB -> 68 MB); function names stay for backtraces.
objcopy --strip-debug "$binary" "$out/llama-server"
chmod 0755 "$out/llama-server"
cp "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json" "$out/tokenizer/"
cp inference-server/tests/goldens/*.json "$out/goldens/"
cp scripts/gpu-check.sh "$out/scripts/"
cp scripts/gpu/gpu_check.py "$out/scripts/gpu/"
cp docs/gpu.md "$out/README.md"
{
  echo "llama-server GPU bundle"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- inference-server 2>/dev/null || echo ' (inference-server modified)')"
  echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # The toolchain's libraries and libcuda stub let the binary start here, without a driver.
  cuda_home=$(scripts/build-cuda-toolchain.sh)
  echo "binary: $(LD_LIBRARY_PATH="$cuda_home/lib/stubs:$cuda_home/lib" "$out/llama-server" --version), CUDA 13.0, compute capability ${CUDA_COMPUTE_CAP:-90}"
  echo "needs: $(objdump -p "$out/llama-server" | awk '/NEEDED/ {print $2}' | tr '\n' ' ')"
  echo
  (cd "$out" && find . -type f ! -name MANIFEST | sort | xargs sha256sum)
} >"$out/MANIFEST"

tar -C "$(dirname "$out")" -czf "$out.tar.gz" "$(basename "$out")"
log "$(du -sh "$out" | cut -f1) in $out; tarball $(du -h "$out.tar.gz" | cut -f1)"
echo "$out.tar.gz"
