#!/usr/bin/env bash
# Shows that the chart's RBAC is least privilege: for every verb of every rule of the operator's
# ClusterRole and Role, runs the install test (operator/tests/helm_install.rs, which runs the
# operator with the chart's ServiceAccount and fails on any refused call) on a copy of the chart
# without that verb, and reports whether the test then fails (the verb is needed) or passes (the
# verb is on a path the test does not take; docs/install.md#rbac says which and why it stays).
# Run it after changing which API calls the operator makes. About 2 minutes per verb.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CONTROL_PLANE_BIN=${LLAMA_CONTROL_PLANE_BIN:-$(scripts/build-control-plane.sh)}
LLAMA_HELM_BIN=${LLAMA_HELM_BIN:-$(scripts/build-helm.sh)}
LLAMA_KARPENTER_CRDS=${LLAMA_KARPENTER_CRDS:-$(scripts/fetch-karpenter-crds.sh)}
export LLAMA_CONTROL_PLANE_BIN LLAMA_HELM_BIN LLAMA_KARPENTER_CRDS
test_bin=$(cargo test -p llama-operator --test helm_install --no-run --locked 2>&1 |
           sed -nE 's/.*Executable .*\((.*)\)/\1/p')
[ -x "$test_bin" ] || { echo "check-rbac: cannot build the install test" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$test_bin" "$work" <<'PY'
import os, shutil, subprocess, sys
test_bin, work = sys.argv[1], sys.argv[2]
chart = "charts/llama-operator"
failed_to_fail = []
for template in ["clusterrole.yaml", "role.yaml"]:
    lines = open(f"{chart}/templates/{template}").read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip().startswith("verbs: ["):
            continue
        rule = " ".join(l.strip() for l in lines[max(0, i - 3):i] if "resources:" in l or "resourceNames:" in l)
        verbs = [v.strip() for v in line.strip()[len("verbs: ["):-1].split(",")]
        for verb in verbs:
            copy = os.path.join(work, "chart")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(chart, copy)
            rest = [v for v in verbs if v != verb] or ["none"]
            mutated = lines[:]
            mutated[i] = line[:line.index("verbs:")] + "verbs: [" + ", ".join(rest) + "]"
            open(f"{copy}/templates/{template}", "w").write("\n".join(mutated))
            run = subprocess.run([test_bin], capture_output=True, text=True, timeout=900,
                                 env=dict(os.environ, LLAMA_CHART_DIR=copy))
            needed = "test result: ok" not in run.stdout
            print(f"{template:18} {rule:70} {verb:7} {'needed (test fails without it)' if needed else 'NOT EXERCISED by the test'}", flush=True)
PY
