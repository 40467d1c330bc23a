# Builds one of the Go tools under tools/ that the tests run, cached under
# ${LLAMA_OPERATOR_CACHE:-~/.cache/llama-operator}/NAME-<hash of its sources and the scripts>/bin,
# and prints that bin directory on stdout. Sourced by scripts/build-<tool>.sh:
#
#   build_go_tool NAME            # tools/NAME (go.mod, go.sum, main.go) -> bin/NAME
#   build_go_tool NAME PACKAGE    # a main package of a module tools/NAME requires -> bin/NAME
#
# GOTOOLCHAIN in the environment picks a newer Go than the local one (the Go module proxy serves it).
build_go_tool() {
  local name=$1 package=${2:-.} root mod cache key bin
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  mod="$root/tools/$name"
  cache="${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}"
  key=$(find "$mod" -maxdepth 1 -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) |
        sort | xargs cat "$0" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)
  bin="$cache/$name-$key/bin"
  if [ -x "$bin/$name" ]; then echo "$bin"; return 0; fi
  command -v go >/dev/null || { echo "build-$name: Go is needed" >&2; return 1; }
  mkdir -p "$bin"
  (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" \
     -o "$bin/$name.tmp" "$package") >&2
  mv "$bin/$name.tmp" "$bin/$name"
  echo "$bin"
}
