#!/usr/bin/env bash
# Builds tools/kstatus (Flux's kstatus, github.com/fluxcd/cli-utils, computing one object's
# status as kustomize-controller's health checks do), which the tests use to check what Flux makes
# of real LlamaDeployments. Cached like the control plane, keyed by the tool's sources; prints the
# bin directory on stdout.
set -euo pipefail
source "$(dirname "$0")/lib/go-tool.sh"
build_go_tool kstatus
