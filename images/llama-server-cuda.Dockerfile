# syntax=docker/dockerfile:1
# The llama-server image for NVIDIA GPUs (CUDA 13.0). Build from the repository root:
#
#   docker build -f images/llama-server-cuda.Dockerfile \
#     -t ghcr.io/llama-operator/llama-server-cuda:0.1.0 .
#
# Needs llama-server's `cuda` feature (candle's CUDA backend): without it this build fails at
# `cargo build --features cuda`. scripts/check-images.sh builds and checks this binary only where
# nvcc is installed, and otherwise prints NOT CHECKED with the reason.

ARG CUDA_VERSION=13.0.0
ARG RUST_VERSION=1.95.0

FROM docker.io/library/node:22-bookworm-slim AS tokenizer
COPY scripts/setup-tokenizer.sh /setup-tokenizer.sh
RUN dir=$(LLAMA_OPERATOR_CACHE=/cache bash /setup-tokenizer.sh) && \
    mkdir /tokenizer && cp "$dir/tokenizer.json" "$dir/tokenizer_config.json" /tokenizer/

# The CUDA toolkit (nvcc, headers) of the runtime's release, on the runtime's Ubuntu (same glibc).
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG RUST_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential && \
    rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "$RUST_VERSION"
# candle's kernels are compiled to PTX for compute capability 8.0 (A100); newer GPUs (H100, 9.0)
# JIT-compile that PTX when it is loaded.
ENV CUDA_COMPUTE_CAP=80
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-release.sh llama-server-cuda /out

# The CUDA 13.0 runtime libraries (cudart, cuBLAS); the driver comes from the node.
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
LABEL org.opencontainers.image.title="llama-server-cuda" \
      org.opencontainers.image.description="Meta Llama inference server (Azure AI Model Inference API), CUDA 13.0 build" \
      org.opencontainers.image.source="https://github.com/llama-operator/llama-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=tokenizer /tokenizer/ /usr/share/llama-server/tokenizer/
COPY --from=build /out/llama-server /usr/local/bin/llama-server
# The GPU image serves on the GPU: LLAMA_SERVER_DEVICE=cuda (a pod without a usable GPU exits 1
# at start with a message saying so).
ENV LLAMA_SERVER_TOKENIZER_DIR=/usr/share/llama-server/tokenizer \
    LLAMA_SERVER_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The base image has no user 65532; a numeric USER needs no passwd entry.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/llama-server"]
