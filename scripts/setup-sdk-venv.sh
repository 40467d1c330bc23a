#!/usr/bin/env bash
# Creates the Python environment of the SDK tests (tests/sdk/): the real, unmodified
# azure-ai-inference and openai clients plus pytest, in the cache outside the source tree.
# Prints the environment's python.
set -euo pipefail

CACHE="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
PACKAGES=(azure-ai-inference==1.0.0b9 azure-core==1.41.0 openai==3.51.0 httpx==0.28.1
          pytest==9.2.0 pyjwt==2.15.1 cryptography==50.0.2)
# The environment is named after its package list, so a changed pin builds a fresh one.
HASH=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)
VENV="$CACHE/sdk-venv-$HASH"

if ! "$VENV/bin/python" -c "import azure.ai.inference, openai, pytest, jwt" >/dev/null 2>&1; then
  echo "setup-sdk-venv: installing ${PACKAGES[*]} into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
  "$VENV/bin/python" -c "import azure.ai.inference, openai, pytest, jwt" >&2
fi
echo "$VENV/bin/python"
