#!/usr/bin/env bash
# Creates the Python environment of the llama.cpp comparison benchmark
# (scripts/bench-vs-llamacpp.sh): a pinned llama-cpp-python compiled from source for this
# machine's CPU (native instructions, OpenMP), in the cache outside the source tree.
# Prints the environment's python. The first run compiles llama.cpp: about 15 minutes on 2 cores.
set -euo pipefail

CACHE="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
PACKAGES=("$LLAMA_CPP_PYTHON" numpy==2.3.5 typing-extensions==4.15.0 diskcache==5.6.3 jinja2==3.1.6)
# A native build: llama.cpp's own CPU kernels for the instructions this CPU has, the setting a
# llama.cpp user on this machine would build with. Examples, tools, tests and the server are not needed.
CMAKE_FLAGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
# Without ggml's AMX kernels: on a CPU with AMX (Sapphire Rapids and later) `-march=native`
# compiles them in, and the pinned ggml then crashes in ggml_backend_amx_mul_mat on the first
# Q4_K or Q8_0 matrix product (SIGSEGV; llama.cpp issue #20824, open without a fix). The three
# flags turn AMX off whatever the order of `-march=native`; every other native instruction
# (AVX-512, VNNI, BF16) and the repacked AVX kernels stay. Elsewhere they change nothing.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# The environment is named after its package list, build flags and CPU, so a changed pin, flag
# or machine builds a fresh one (a native build is only valid on the CPU it was built for).
CPU=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true)
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true)
HASH=$(printf '%s\n' "${PACKAGES[@]}" "$CMAKE_FLAGS" "$NO_AMX" "$CPU" "$FLAGS" | sha256sum | cut -c1-12)
VENV="$CACHE/llamacpp-venv-$HASH"
CHECK="import llama_cpp; assert llama_cpp.__version__ == '${LLAMA_CPP_PYTHON#*==}'"

if ! "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  command -v cmake >/dev/null || { echo "setup-llamacpp-venv: cmake is needed (apt-get install cmake)" >&2; exit 1; }
  command -v g++ >/dev/null || { echo "setup-llamacpp-venv: a C++ compiler is needed (apt-get install g++)" >&2; exit 1; }
  echo "setup-llamacpp-venv: building $LLAMA_CPP_PYTHON from source into $VENV (takes a while)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  CMAKE_ARGS="$CMAKE_FLAGS" CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    --no-binary llama-cpp-python "${PACKAGES[@]}" >&2
  "$VENV/bin/python" -c "$CHECK" >&2
fi
echo "$VENV/bin/python"
