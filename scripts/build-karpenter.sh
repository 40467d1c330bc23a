#!/usr/bin/env bash
# Builds real Karpenter with its kwok cloud provider (sigs.k8s.io/karpenter/kwok, pinned in
# tools/karpenter-kwok/go.mod) for the tests of the karpenter node-pool provider: the same
# provisioning, registration and termination controllers as on a cloud, with Nodes that kwok runs.
# About 7 minutes on 2 cores the first time; cached like the control plane. Prints the bin directory.
set -euo pipefail
source "$(dirname "$0")/lib/go-tool.sh"
# Karpenter v1.15.0 needs Go >= 1.26.9; the module proxy serves the toolchain.
export GOTOOLCHAIN=go1.26.10
build_go_tool karpenter-kwok sigs.k8s.io/karpenter/kwok
