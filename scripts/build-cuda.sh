#!/usr/bin/env bash
# Builds the CUDA release binary of llama-server (`--features cuda`, candle's CUDA backend) on any
# Linux x86_64 machine, GPU or not, and prints its path.
#
#   scripts/build-cuda.sh            # -> ~/.cache/llama-operator/cuda-target/release/llama-server
#
# The CUDA 13.0 toolchain comes from scripts/build-cuda-toolchain.sh (PyPI wheels plus a libcuda
# stub, cached). The kernels are compiled for compute capability $CUDA_COMPUTE_CAP (default 90:
# H100 and H200, as sm_90a). The build has its own target directory, $LLAMA_CUDA_TARGET_DIR,
# default ${LLAMA_OPERATOR_CACHE:-~/.cache/llama-operator}/cuda-target: apart from the CPU build's
# target/, so neither invalidates the other, and outside the checkout, so that a fresh clone (CI)
# reuses the compiled CUDA kernels instead of paying for them again. A cold build is about 31
# CPU-minutes (most of it nvcc on candle's kernels): 58 minutes measured on a busy 2-core machine
# at nice 19; a rebuild after a change to llama-server only recompiles llama-server.
#
# The binary needs, at run time, the NVIDIA driver (libcuda.so.1) and the CUDA 13.0 libraries
# cudart, cuBLAS (with cuBLASLt) and cuRAND: on a GPU host with CUDA 13.0 under /usr/local/cuda,
# LD_LIBRARY_PATH=/usr/local/cuda/lib64 (the nvidia/cuda runtime images set that up already).
set -euo pipefail
cd "$(dirname "$0")/.."

cuda_home=$(scripts/build-cuda-toolchain.sh)
cache=${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}
target_dir=${LLAMA_CUDA_TARGET_DIR:-$cache/cuda-target}

export CUDA_HOME="$cuda_home" CUDA_ROOT="$cuda_home" CUDA_PATH="$cuda_home"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# candle-kernels and cudarc ask nvcc for the CUDA version; nvcc must be first on PATH so that a
# system toolkit of another release is not picked up instead.
export PATH="$cuda_home/bin:$PATH"
# The linker finds -lcuda in the stub directory, the rest beside it.
export LIBRARY_PATH="$cuda_home/lib/stubs:$cuda_home/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target_dir"

started=$SECONDS
echo "build-cuda: cargo build --release -p llama-server --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $target_dir)" >&2
cargo build --release --locked -p llama-server --bin llama-server --features cuda >&2
bin="$target_dir/release/llama-server"
echo "build-cuda: built $bin ($(du -h "$bin" | cut -f1), $((SECONDS - started)) s)" >&2
echo "$bin"
