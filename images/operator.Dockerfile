# syntax=docker/dockerfile:1
# The llama-operator image. Build from the repository root:
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/llama-operator/llama-operator:0.1.0 .
#
# The binary is built by scripts/build-release.sh, as scripts/check-images.sh builds and checks it
# (which also runs in scripts/test.sh): rustls, no OpenSSL; it needs only glibc and libgcc_s.

# Debian 12 (bookworm), the release of the runtime image: same glibc.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-release.sh operator /out

# glibc, libgcc_s, CA certificates, a passwd entry for uid 65532; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="llama-operator" \
      org.opencontainers.image.description="Kubernetes operator for Meta Llama deployments" \
      org.opencontainers.image.source="https://github.com/llama-operator/llama-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/llama-operator /usr/local/bin/llama-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/llama-operator"]
