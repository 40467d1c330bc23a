#!/usr/bin/env bash
# Fetches Karpenter's published CRDs (NodePool, NodeClaim, NodeOverlay, and the kwok provider's
# KWOKNodeClass) from the sigs.k8s.io/karpenter Go module into the cache; prints the directory.
# The version is the one tools/karpenter-kwok/go.mod pins (the Karpenter the tests run).
set -euo pipefail
KARPENTER_VERSION=$(awk '$1 == "sigs.k8s.io/karpenter" { print $2 }' \
  "$(dirname "$0")/../tools/karpenter-kwok/go.mod")
[ -n "$KARPENTER_VERSION" ] || { echo "fetch-karpenter-crds: no Karpenter in tools/karpenter-kwok/go.mod" >&2; exit 1; }
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
files_key=2  # bump when the list below changes
out="$cache/karpenter-crds-$KARPENTER_VERSION-$files_key"
files=(pkg/apis/crds/karpenter.sh_nodepools.yaml pkg/apis/crds/karpenter.sh_nodeclaims.yaml
       pkg/apis/crds/karpenter.sh_nodeoverlays.yaml
       kwok/apis/crds/karpenter.kwok.sh_kwoknodeclasses.yaml)
if [ ! -s "$out/karpenter.sh_nodepools.yaml" ]; then
  command -v go >/dev/null || { echo "fetch-karpenter-crds: Go is needed" >&2; exit 1; }
  # Only the module zip is needed (its go directive may be newer than the local toolchain).
  zip=$(cd "$(mktemp -d)" && { go mod download -json "sigs.k8s.io/karpenter@$KARPENTER_VERSION" || true; } |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Zip"])')
  mkdir -p "$out.tmp"
  for f in "${files[@]}"; do
    unzip -p "$zip" "sigs.k8s.io/karpenter@$KARPENTER_VERSION/$f" > "$out.tmp/$(basename "$f")"
  done
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out"
