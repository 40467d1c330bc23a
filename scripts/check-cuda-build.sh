#!/usr/bin/env bash
# The CUDA build's compile check, run by scripts/test.sh on machines without a GPU so that the GPU
# path never stops compiling:
#   - builds llama-server with `--features cuda` (scripts/build-cuda.sh: CUDA 13.0 from PyPI
#     wheels, a libcuda stub, sm_90a kernels);
#   - checks that the binary links the driver (libcuda.so.1) and the CUDA 13.0 libraries
#     (cudart, cuBLAS, cuRAND; cuBLASLt through cuBLAS), and that they resolve against the
#     toolchain;
#   - runs it with the stub in place of a driver: it starts, serves the CPU (check-goldens
#     --device cpu passes), and `--device cuda` fails at once, exit 1, with the "no CUDA driver or
#     GPU" message (serve, LLAMA_SERVER_DEVICE, bench);
#   - without any libcuda.so.1 the dynamic loader refuses to start it (a CUDA build needs the
#     NVIDIA driver's library even for --device cpu; the CUDA image runs on GPU nodes only).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "check-cuda-build: $*" >&2; }
fail() { echo "check-cuda-build: FAILED: $*" >&2; exit 1; }

started=$SECONDS
cuda_home=$(scripts/build-cuda-toolchain.sh)
bin=$(scripts/build-cuda.sh)
log "built $bin ($(du -h "$bin" | cut -f1)) in $((SECONDS - started)) s"

needed=$(objdump -p "$bin" | awk '/NEEDED/ {print $2}')
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcurand.so.10; do
  grep -qx "$lib" <<<"$needed" || fail "$bin does not link $lib (it links: $(echo $needed))"
done
log "links: $(echo $needed)"

# The stub stands in for the driver: the libraries resolve, the binary starts.
stub_env=(env "LD_LIBRARY_PATH=$cuda_home/lib/stubs:$cuda_home/lib" RUST_LOG=warn)
unresolved=$("${stub_env[@]}" ldd "$bin" | grep 'not found' || true)
[ -z "$unresolved" ] || fail "unresolved libraries: $unresolved"
log "ldd (toolchain libraries, libcuda stub):"
"${stub_env[@]}" ldd "$bin" | grep -E 'libcuda|libcublas|libcurand' | sed 's/^/    /' >&2
version=$("${stub_env[@]}" "$bin" --version) || fail "the CUDA binary does not start"
log "$version starts"

tokenizer=$(scripts/setup-tokenizer.sh)
"${stub_env[@]}" "$bin" check-goldens --device cpu --dtypes f32 \
  --goldens inference-server/tests/goldens --tokenizer-dir "$tokenizer" >&2 ||
  fail "the CUDA build does not pass the goldens on the CPU"

# expect_no_gpu DESCRIPTION COMMAND...: exit 1 and the no-GPU message, promptly.
expect_no_gpu() {
  local what=$1 out rc=0
  shift
  out=$(timeout 60 "$@" 2>&1 >/dev/null) || rc=$?
  [ "$rc" = 1 ] || fail "$what: exit $rc, expected 1: $out"
  grep -q "no CUDA driver or GPU found" <<<"$out" || fail "$what: unexpected message: $out"
  log "$what: exit 1: $(tail -1 <<<"$out")"
}
expect_no_gpu "serve --device cuda" "${stub_env[@]}" "$bin" serve --device cuda --listen 127.0.0.1:0
expect_no_gpu "LLAMA_SERVER_DEVICE=cuda:1" "${stub_env[@]}" LLAMA_SERVER_DEVICE=cuda:1 "$bin" --listen 127.0.0.1:0
expect_no_gpu "bench --device cuda" "${stub_env[@]}" "$bin" bench --device cuda --shape tiny --tokenizer-dir "$tokenizer"

# No driver library at all: the loader stops before main.
rc=0
out=$(env "LD_LIBRARY_PATH=$cuda_home/lib" "$bin" --version 2>&1) || rc=$?
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  log "this machine has a libcuda.so.1 installed; skipping the no-driver start check"
else
  [ "$rc" = 127 ] && grep -q "libcuda.so.1" <<<"$out" ||
    fail "without libcuda.so.1 the binary should not start: exit $rc: $out"
  log "without any libcuda.so.1: exit 127 ($out)"
fi
log "ok ($((SECONDS - started)) s)"
