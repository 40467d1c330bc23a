#!/usr/bin/env bash
# Builds tools/argocd-health (Argo CD's Lua interpreter, gopher-lua, running a resource health
# check on one object), which the tests use to check docs/argocd/*.lua on real objects. Cached
# like the control plane, keyed by the tool's sources; prints the bin directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mod="$root/tools/argocd-health"
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
key=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/main.go" "$0" | sha256sum | cut -c1-12)
bin="$cache/argocd-health-$key/bin"
if [ -x "$bin/argocd-health" ]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { echo "build-argocd-health: Go is needed" >&2; exit 1; }
mkdir -p "$bin"
(cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$bin/argocd-health.tmp" .) >&2
mv "$bin/argocd-health.tmp" "$bin/argocd-health"
echo "$bin"
