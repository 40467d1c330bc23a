#!/usr/bin/env bash
# Builds one image's binary the way the image does (the Dockerfiles under images/ run this very
# script) and copies it into OUT_DIR. Prints the copied binary's path.
#
#   scripts/build-release.sh operator|llama-server|llama-server-cuda OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: build-release.sh operator|llama-server|llama-server-cuda OUT_DIR}
out=${2:?usage: build-release.sh operator|llama-server|llama-server-cuda OUT_DIR}
case "$image" in
  operator)          package=llama-operator; bin=llama-operator; features=() ;;
  llama-server)      package=llama-server;   bin=llama-server;   features=() ;;
  # The CUDA build: candle's CUDA kernels behind llama-server's `cuda` feature.
  llama-server-cuda) package=llama-server;   bin=llama-server;   features=(--features cuda) ;;
  *) echo "build-release: unknown image $image" >&2; exit 2 ;;
esac
cargo build --release --locked -p "$package" --bin "$bin" "${features[@]}" >&2
mkdir -p "$out"
cp "${CARGO_TARGET_DIR:-target}/release/$bin" "$out/$bin"
echo "$out/$bin"
