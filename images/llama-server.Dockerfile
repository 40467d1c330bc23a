# syntax=docker/dockerfile:1
# The llama-server image (CPU). Build from the repository root:
#
#   docker build -f images/llama-server.Dockerfile -t ghcr.io/llama-operator/llama-server:0.1.0 .
#
# The binary is built by scripts/build-release.sh and the tokenizer installed by
# scripts/setup-tokenizer.sh, as scripts/check-images.sh (run by scripts/test.sh) builds and
# checks them.

# The real Llama 3.1 tokenizer (tokenizer.json, tokenizer_config.json), checksum-verified.
FROM docker.io/library/node:22-bookworm-slim AS tokenizer
COPY scripts/setup-tokenizer.sh /setup-tokenizer.sh
RUN dir=$(LLAMA_OPERATOR_CACHE=/cache bash /setup-tokenizer.sh) && \
    mkdir /tokenizer && cp "$dir/tokenizer.json" "$dir/tokenizer_config.json" /tokenizer/

# Debian 12 (bookworm), the release of the runtime image: same glibc.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-release.sh llama-server /out

# glibc, libgcc_s, CA certificates (for `llama-server fetch` over TLS), uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="llama-server" \
      org.opencontainers.image.description="Meta Llama inference server (Azure AI Model Inference API), CPU build" \
      org.opencontainers.image.source="https://github.com/llama-operator/llama-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=tokenizer /tokenizer/ /usr/share/llama-server/tokenizer/
COPY --from=build /out/llama-server /usr/local/bin/llama-server
ENV LLAMA_SERVER_TOKENIZER_DIR=/usr/share/llama-server/tokenizer
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/llama-server"]
