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
key=$(cat "$mod/go.mod" "$mod/go.sum" "$0" | sha256sum | cut -c1-12)
bin="$cache/control-plane-$key/bin"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

have_all() {
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
  [ -s "$bin/kwok-stages.yaml" ]
}
if have_all; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-control-plane: Go is needed to build the test control plane" >&2; exit 1; }
mkdir -p "$bin"
log() { echo "build-control-plane: $*" >&2; }
# Stamp the release into the binaries (a plain `go build` reports v0.0.0-master).
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$mod/go.mod")
minor=$(echo "$k8s_version" | cut -d. -f2)
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
flags=(-trimpath -ldflags "-s -w$stamp")
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
# kwok simulates node and pod lifecycles through "stages"; use the set its release ships
# (nodes become Ready and keep a lease; pods become Ready, complete and are deleted).
if [ ! -s "$bin/kwok-stages.yaml" ]; then
  stages="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  [ -d "$stages" ] || (cd "$mod" && go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; cat "$stages/$f"
  done > "$bin/kwok-stages.yaml.tmp"
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
fi
have_all
echo "$bin"
