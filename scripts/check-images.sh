#!/usr/bin/env bash
# Checks what the images under images/ would contain, without a container engine: builds each
# image's binary with the same script the Dockerfile runs (scripts/build-release.sh: release
# profile, same features), stages the files at the image's paths, and checks that
#   - the Dockerfile really builds with that script, runs as uid 65532 and ships on the runtime
#     base whose glibc the binary was built against;
#   - the binary runs as uid 65532 (`--help`, `--version`) from the staged tree;
#   - it links only libraries the runtime base has (glibc, libgcc_s, libstdc++, libgomp) and no
#     glibc symbol newer than the base's;
#   - the llama-server images bundle the real Llama 3.1 tokenizer at LLAMA_SERVER_TOKENIZER_DIR.
# The release builds are incremental after the first run (target/release is reused).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage="${CARGO_TARGET_DIR:-target}/image-check"
rm -rf "$stage"
log() { echo "check-images: $*" >&2; }
fail() { echo "check-images: FAILED: $*" >&2; exit 1; }

# What distroless/cc-debian12 (Debian 12, glibc 2.36) provides.
allowed_libs='^(linux-vdso\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-x86-64\.so\.2|libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libgcc_s\.so\.1|libstdc\+\+\.so\.6|libgomp\.so\.1)$'
max_glibc=2.36
nonroot=(setpriv --reuid 65532 --regid 65532 --clear-groups)

# dockerfile_value FILE REGEX: the first match's first group.
dockerfile_value() { sed -nE "s#$2#\\1#p" "$1" | head -1; }

check_dockerfile() { # dockerfile image
  local file=$1 image=$2
  grep -qE "^\s*scripts/build-release\.sh $image /out\s*$" "$file" ||
    fail "$file does not build with scripts/build-release.sh $image"
  [ "$(grep -E '^USER ' "$file" | tail -1)" = "USER 65532:65532" ] || fail "$file: last USER is not 65532:65532"
  local runtime
  runtime=$(grep -E '^FROM ' "$file" | tail -1)
  case "$image" in
    llama-server-cuda)
      [[ $runtime == *nvidia/cuda:*-runtime-ubuntu24.04* ]] || fail "$file: runtime base is $runtime"
      grep -qE '^FROM .*nvidia/cuda:\$\{CUDA_VERSION\}-devel-ubuntu24.04 AS build' "$file" ||
        fail "$file: the build stage is not the CUDA devel image of the runtime's Ubuntu"
      grep -qE '^ARG CUDA_VERSION=13\.0\.' "$file" || fail "$file: not CUDA 13.0" ;;
    *)
      [ "$runtime" = "FROM gcr.io/distroless/cc-debian12:nonroot" ] || fail "$file: runtime base is $runtime"
      grep -qE '^FROM docker.io/library/rust:[0-9.]+-bookworm AS build$' "$file" ||
        fail "$file: the build stage is not Debian 12 (bookworm), the runtime's release" ;;
  esac
}

check_binary() { # path
  local bin=$1 libs bad newest
  [ -x "$bin" ] || fail "$bin is not executable"
  # The image's file mode: root-owned, world-executable; uid 65532 must be able to run it.
  chmod 0755 "$bin"
  libs=$(ldd "$bin" | awk '{print $1}')
  bad=$(echo "$libs" | grep -vE "$allowed_libs" || true)
  [ -z "$bad" ] || fail "$bin links libraries the runtime image lacks or we do not expect: $bad"
  newest=$(objdump -T "$bin" | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sed 's/GLIBC_//' | sort -V | tail -1)
  [ "$(printf '%s\n%s\n' "$newest" "$max_glibc" | sort -V | tail -1)" = "$max_glibc" ] ||
    fail "$bin needs glibc $newest, the runtime image has $max_glibc"
  log "$(basename "$bin"): links $(echo "$libs" | tr '\n' ' '); glibc symbols up to $newest"
}

tokenizer_sha() { # name -> expected sha256 of the Llama 3.1 file, from setup-tokenizer.sh
  sed -nE "s#^\s*\[llama3_1/$1\]=([0-9a-f]{64})\s*\$#\\1#p" scripts/setup-tokenizer.sh
}

# --- operator ---------------------------------------------------------------------------------
log "operator: building as images/operator.Dockerfile does"
check_dockerfile images/operator.Dockerfile operator
rootfs="$stage/operator"
bin=$(scripts/build-release.sh operator "$rootfs/usr/local/bin")
check_binary "$bin"
chmod -R a+rX "$stage"
help=$("${nonroot[@]}" "$bin" --help) || fail "llama-operator --help failed as uid 65532"
for flag in --config --namespace --metrics-addr --leader-elect --lease-namespace --lease-name; do
  grep -q -- "$flag" <<<"$help" || fail "llama-operator --help does not list $flag"
done
# The chart passes exactly these flags; a bad one must be refused, not ignored.
if "${nonroot[@]}" "$bin" --no-such-flag >/dev/null 2>&1; then fail "llama-operator accepted an unknown flag"; fi
log "operator: ok (runs as uid 65532; --help lists the chart's flags)"

# --- llama-server (CPU) -----------------------------------------------------------------------
check_server_image() { # dockerfile image
  local file=$1 image=$2 rootfs tokdir src bin
  rootfs="$stage/$image"
  check_dockerfile "$file" "$image"
  tokdir=$(dockerfile_value "$file" '^ENV LLAMA_SERVER_TOKENIZER_DIR=([^ \\]+).*$')
  [ "$tokdir" = /usr/share/llama-server/tokenizer ] || fail "$file: LLAMA_SERVER_TOKENIZER_DIR is '$tokdir'"
  grep -qE "^COPY --from=tokenizer /tokenizer/ $tokdir/\$" "$file" || fail "$file does not copy the tokenizer to $tokdir"
  # The tokenizer stage runs setup-tokenizer.sh; so does this check, into the same layout.
  src=$(scripts/setup-tokenizer.sh)
  mkdir -p "$rootfs$tokdir"
  cp "$src/tokenizer.json" "$src/tokenizer_config.json" "$rootfs$tokdir/"
  for f in tokenizer.json tokenizer_config.json; do
    echo "$(tokenizer_sha "$f")  $rootfs$tokdir/$f" | sha256sum --check --status - ||
      fail "$image: $tokdir/$f is not the Llama 3.1 file"
  done
  bin=$(scripts/build-release.sh "$image" "$rootfs/usr/local/bin")
  check_binary "$bin"
  chmod -R a+rX "$stage"
  local version
  version=$(LLAMA_SERVER_TOKENIZER_DIR="$rootfs$tokdir" "${nonroot[@]}" "$bin" --version) ||
    fail "llama-server --version failed as uid 65532"
  [ "$version" = "llama-server $(sed -nE 's/^version = "(.*)"/\1/p' Cargo.toml | head -1)" ] ||
    fail "llama-server --version printed '$version'"
  LLAMA_SERVER_TOKENIZER_DIR="$rootfs$tokdir" "${nonroot[@]}" "$bin" --help >/dev/null ||
    fail "llama-server --help failed as uid 65532"
  log "$image: ok ($version; runs as uid 65532; tokenizer at $tokdir)"
}
log "llama-server: building as images/llama-server.Dockerfile does"
check_server_image images/llama-server.Dockerfile llama-server

# --- llama-server (CUDA) ----------------------------------------------------------------------
if cargo metadata --format-version 1 --no-deps --locked |
   python3 -c 'import json,sys; m=json.load(sys.stdin); p=[p for p in m["packages"] if p["name"]=="llama-server"][0]; sys.exit(0 if "cuda" in p["features"] else 1)'; then
  if command -v nvcc >/dev/null; then
    log "llama-server-cuda: building as images/llama-server-cuda.Dockerfile does"
    check_server_image images/llama-server-cuda.Dockerfile llama-server-cuda
  else
    check_dockerfile images/llama-server-cuda.Dockerfile llama-server-cuda
    log "NOT CHECKED here: the llama-server-cuda binary (no nvcc on PATH); its Dockerfile was checked, and scripts/check-cuda-build.sh (a later step of scripts/test.sh) compile-checks --features cuda with CUDA 13.0"
  fi
else
  check_dockerfile images/llama-server-cuda.Dockerfile llama-server-cuda
  log "NOT CHECKED: the llama-server-cuda binary: llama-server has no \`cuda\` feature yet, so images/llama-server-cuda.Dockerfile cannot build; its Dockerfile was checked"
fi
log "all image checks passed"
