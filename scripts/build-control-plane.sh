#!/usr/bin/env bash
# Builds the real Kubernetes control plane that the tests run against: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler (pinned in tools/control-plane/go.mod) and kwok.
# Binaries land in a cache outside the source tree, keyed by the pinned versions, and are reused.
# Prints the bin directory on stdout.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
mod="$root/tools/control-plane"
KWOK_VERSION=v0.8.0
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
key=$(cat "$mod/go.mod" "$mod/go.sum" <(echo "kwok $KWOK_VERSION") | sha256sum | cut -c1-12)
bin="$cache/control-plane-$key/bin"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

have_all() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-control-plane: Go is needed to build the test control plane" >&2; exit 1; }
mkdir -p "$bin"
log() { echo "build-control-plane: $*" >&2; }
flags=(-trimpath -ldflags "-s -w")
build() { # name package
  [ -x "$bin/$1" ] && return 0
  local t0=$SECONDS
  log "building $1 ($2)"
  (cd "$mod" && CGO_ENABLED=0 go build "${flags[@]}" -o "$bin/$1.tmp" "$2") >&2
  mv "$bin/$1.tmp" "$bin/$1"
  log "built $1 in $((SECONDS - t0)) s"
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build kubectl k8s.io/kubernetes/cmd/kubectl
if [ ! -x "$bin/kwok" ]; then
  t0=$SECONDS
  log "building kwok $KWOK_VERSION"
  CGO_ENABLED=0 GOBIN="$bin" go install "${flags[@]}" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
  log "built kwok in $((SECONDS - t0)) s"
fi
have_all
echo "$bin"
