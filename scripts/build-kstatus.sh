#!/usr/bin/env bash
# Builds tools/kstatus (Flux's kstatus, github.com/fluxcd/cli-utils, computing one object's
# status as kustomize-controller's health checks do), which the tests use to check what Flux makes
# of real LlamaDeployments. Cached like the control plane, keyed by the tool's sources; prints the
# bin directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mod="$root/tools/kstatus"
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
key=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/main.go" "$0" | sha256sum | cut -c1-12)
bin="$cache/kstatus-$key/bin"
if [ -x "$bin/kstatus" ]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { echo "build-kstatus: Go is needed" >&2; exit 1; }
mkdir -p "$bin"
(cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$bin/kstatus.tmp" .) >&2
mv "$bin/kstatus.tmp" "$bin/kstatus"
echo "$bin"
