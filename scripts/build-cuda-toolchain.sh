#!/usr/bin/env bash
# Assembles (once) a CUDA 13.0 toolkit good enough to *compile* llama-server's `cuda` feature on a
# machine with no CUDA installation and no GPU, and prints its directory (a CUDA_HOME):
#
#   bin/nvcc (+ ptxas, fatbinary, nvlink, cudafe++), nvvm/ (cicc, libdevice), include/ (runtime,
#   crt, CCCL, cuBLAS, cuRAND, NVRTC headers), lib/ (cudart, cuBLAS, cuBLASLt, cuRAND, NVRTC,
#   NVVM), lib64 -> lib, and lib/stubs/libcuda.so{,.1}: a stub of the driver library.
#
# Everything but the stub comes from NVIDIA's PyPI wheels (each unpacks under nvidia/cu13/),
# pinned by version and sha256 and merged into one tree. The driver library (libcuda) ships with
# the NVIDIA driver, in no wheel; binaries link against the stub (soname libcuda.so.1), and at run
# time the host's real driver provides the same symbols. The stub defines every `cu*` entry
# point that cuda.h declares, each returning CUDA_ERROR_STUB_LIBRARY (34), as NVIDIA's own stub
# does, so a binary that finds only the stub fails cleanly instead of crashing.
#
# Cached under ${LLAMA_OPERATOR_CACHE:-~/.cache/llama-operator}/cuda-13.0-<hash>, the hash
# covering the pinned wheels and the stub recipe; a second run prints the directory at once.
# About 680 MB of wheels are downloaded (cuBLAS is 420 MB), 1.2 GB unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."

cuda_version=13.0
# name==version sha256 (the manylinux x86_64 wheel).
wheels=(
  "nvidia-cuda-nvcc==13.0.88 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-cuda-crt==13.0.88 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-nvvm==13.0.88 c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-runtime==13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cuda-cccl==13.0.85 e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
  "nvidia-cublas==13.1.0.3 ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"
  "nvidia-curand==10.4.0.35 1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc"
  "nvidia-cuda-nvrtc==13.0.88 ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"
)
# Bump when the way the tree or the stub is made changes: a new hash means a fresh tree.
recipe=2

log() { echo "build-cuda-toolchain: $*" >&2; }
fail() { echo "build-cuda-toolchain: FAILED: $*" >&2; exit 1; }

key=$(printf '%s\n' "$cuda_version" "$recipe" "${wheels[@]}" | sha256sum | cut -c1-12)
cache=${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}
home="$cache/cuda-$cuda_version-$key"
if [ -f "$home/.complete" ]; then
  echo "$home"
  exit 0
fi

for tool in python3 cc; do
  command -v "$tool" >/dev/null || fail "$tool is needed"
done
mkdir -p "$cache"
# One builder at a time; a second waits and then finds the finished tree.
exec 9>"$cache/.cuda-$cuda_version-$key.lock"
flock 9
if [ -f "$home/.complete" ]; then
  echo "$home"
  exit 0
fi

work=$(mktemp -d "$cache/.cuda-$cuda_version-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
requirements="$work/requirements.txt"
for entry in "${wheels[@]}"; do
  echo "${entry% *} --hash=sha256:${entry#* }"
done >"$requirements"

log "downloading ${#wheels[@]} CUDA $cuda_version wheels (about 680 MB)"
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -r "$requirements" -d "$work/wheels" >&2 || fail "pip download"

log "merging the wheels into one CUDA_HOME"
python3 - "$work/wheels" "$work/cuda" <<'EOF'
# Unpacks nvidia/cu13/ of every wheel into one tree, keeping the executable bits zipfile drops.
import pathlib, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
prefix = "nvidia/cu13/"
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            if rel.startswith(".metadata/"):
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(mode if mode else 0o644)
EOF
cuda="$work/cuda"
[ -x "$cuda/bin/nvcc" ] || fail "the nvcc wheel did not provide bin/nvcc"

# Unversioned names for the linker (-lcublas finds libcublas.so), and lib64 for tools that
# look there (nvcc.profile's -L$(TOP)/lib64).
for lib in "$cuda"/lib/lib*.so.*; do
  name=$(basename "$lib")
  base=${name%%.so.*}.so
  [ -e "$cuda/lib/$base" ] || ln -s "$name" "$cuda/lib/$base"
done
ln -s lib "$cuda/lib64"

log "making the libcuda stub from cuda.h"
mkdir -p "$cuda/lib/stubs"
# After preprocessing, cuda.h's `#define cuFoo cuFoo_v2` names are the symbols binaries bind to.
cc -E -P -D__CUDA_API_VERSION_INTERNAL=0 -I"$cuda/include" "$cuda/include/cuda.h" |
  python3 -c '
import re, sys
names = sorted(set(re.findall(r"\b(cu[A-Z][A-Za-z0-9_]*)\s*\(", sys.stdin.read())))
if len(names) < 300:
    sys.exit(f"only {len(names)} cu* functions found in cuda.h")
print("/* Link-time stub of the CUDA driver library, generated from cuda.h. */")
print("#define CUDA_ERROR_STUB_LIBRARY 34")
for name in names:
    print(f"int {name}(void) {{ return CUDA_ERROR_STUB_LIBRARY; }}")
' >"$cuda/lib/stubs/libcuda-stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so.1" \
  "$cuda/lib/stubs/libcuda-stub.c"
ln -s libcuda.so.1 "$cuda/lib/stubs/libcuda.so"

version=$("$cuda/bin/nvcc" --version | sed -nE 's/.*release ([0-9]+\.[0-9]+).*/\1/p')
[ "$version" = "$cuda_version" ] || fail "nvcc reports release '$version', expected $cuda_version"
symbols=$(grep -c '^int cu' "$cuda/lib/stubs/libcuda-stub.c")
{
  echo "cuda $cuda_version (recipe $recipe), nvcc release $version, libcuda stub with $symbols symbols"
  printf '%s\n' "${wheels[@]}"
} >"$cuda/.complete"
rm -rf "$home"
mv "$cuda" "$home"
log "ready: $home (nvcc $version; stub defines $symbols cu* functions)"
echo "$home"
