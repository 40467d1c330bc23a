#!/usr/bin/env bash
# Builds tools/argocd-health (Argo CD's Lua interpreter, gopher-lua, running a resource health
# check on one object), which the tests use to check docs/argocd/*.lua on real objects. Cached
# like the control plane, keyed by the tool's sources; prints the bin directory on stdout.
set -euo pipefail
source "$(dirname "$0")/lib/go-tool.sh"
build_go_tool argocd-health
