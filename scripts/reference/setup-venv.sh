#!/usr/bin/env bash
# Creates the Python environment of scripts/reference/make_goldens.py (transformers + torch on
# the CPU) in the cache, outside the source tree, and prints its python.
#
# Only needed to regenerate the goldens under inference-server/tests/goldens/; the Rust tests
# read the committed files and never need torch.
#
# Note: the Linux torch wheels on PyPI are CUDA builds. `pip install --no-deps torch` installs
# but fails at `import torch` (libcudart.so.13 missing), so the full dependency set (CUDA
# runtime wheels, ~5.6 GiB in all) is installed even though only the CPU is used.
set -euo pipefail

CACHE="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
VENV="$CACHE/reference-venv"
PACKAGES=(torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 numpy)

if ! "$VENV/bin/python" -c "import torch, transformers" >/dev/null 2>&1; then
  echo "setup-venv: installing ${PACKAGES[*]} into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "${PACKAGES[@]}" >&2
  "$VENV/bin/python" -c "import torch, transformers" >&2
fi
echo "$VENV/bin/python"
