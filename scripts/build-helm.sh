#!/usr/bin/env bash
# Builds the real `helm` (v3, from its Go module helm.sh/helm/v3) that the chart tests install
# with. Like the control plane it lands in a cache outside the source tree, keyed by this script
# (which pins the version), and is reused. Prints the bin directory on stdout.
#
# A sibling of build-control-plane.sh rather than part of it: that script's cache key hashes the
# script itself, so adding helm there would rebuild the whole control plane (~20 minutes).
set -euo pipefail

HELM_VERSION=v3.22.0
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
key=$(sha256sum < "$0" | cut -c1-12)
bin="$cache/helm-$HELM_VERSION-$key/bin"
if [ -x "$bin/helm" ]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-helm: Go is needed to build helm" >&2; exit 1; }
log() { echo "build-helm: $*" >&2; }
mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
log "building helm $HELM_VERSION (helm.sh/helm/v3/cmd/helm)"
# Fetch the module (its own go.mod pins every dependency) and read which Kubernetes client
# libraries it uses: like helm's Makefile, stamp that release as the default kube version that
# `helm lint` and `helm template` assume.
dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
client_go=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$dir/go.mod")
k8s_minor=$(echo "$client_go" | cut -d. -f2)
[ -n "$k8s_minor" ] || { echo "build-helm: no k8s.io/client-go in helm's go.mod" >&2; exit 1; }
ldflags="-s -w"
ldflags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done
(cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod GOBIN="$work/out" \
   go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
"$work/out/helm" version --short | grep -q "^$HELM_VERSION" ||
  { echo "build-helm: built helm does not report $HELM_VERSION" >&2; exit 1; }
mv "$work/out/helm" "$bin/helm"
log "built helm in $((SECONDS - t0)) s"
echo "$bin"
