#!/usr/bin/env bash
# Fetches the Prometheus Operator's published ServiceMonitor CRD from its Go module
# (github.com/prometheus-operator/prometheus-operator) into the cache; prints the directory.
# The chart tests install it so that the chart's optional ServiceMonitor is validated by the API
# server like every other object.
set -euo pipefail
PROMETHEUS_OPERATOR_VERSION=v0.85.0
cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
out="$cache/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
files=(example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml)
if [ ! -s "$out/monitoring.coreos.com_servicemonitors.yaml" ]; then
  command -v go >/dev/null || { echo "fetch-prometheus-operator-crds: Go is needed" >&2; exit 1; }
  mod=github.com/prometheus-operator/prometheus-operator
  zip=$(cd "$(mktemp -d)" && { go mod download -json "$mod@$PROMETHEUS_OPERATOR_VERSION" || true; } |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Zip"])')
  mkdir -p "$out.tmp"
  for f in "${files[@]}"; do
    unzip -p "$zip" "$mod@$PROMETHEUS_OPERATOR_VERSION/$f" > "$out.tmp/$(basename "$f")"
  done
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out"
