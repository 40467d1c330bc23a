#!/usr/bin/env bash
# The GPU check of llama-server's CUDA build, in one command, on a GPU host that has the NVIDIA
# driver, the CUDA 13.0 runtime (/usr/local/cuda), Python with torch and transformers, and
# neither a Rust toolchain nor a network. Run it from the bundle that scripts/make-gpu-bundle.sh
# makes (the CUDA binary, the tokenizer, the goldens and these scripts):
#
#   llama-server-gpu-bundle/scripts/gpu-check.sh [--out DIR] [--shapes llama-3.2-1b,llama-3.1-8b]
#
# Steps, each leaving a JSON file in --out:
#   1. environment: nvidia-smi, the binary's libraries (ldd: every one must resolve);
#   2. bandwidth.json: device-to-device copy bandwidth (torch), which sets the decode ceiling;
#   3. goldens.json: `llama-server check-goldens` on the GPU against the transformers goldens
#      (f32: greedy tokens identical; bf16: logits and teacher-forced margins within tolerance);
#      with --gpus N > 1 (on a GPU, the default is every GPU nvidia-smi lists) also
#      goldens-split.json: the same with each model's layers split round N GPUs;
#   4. serve.json: `llama-server serve --device cuda` with the demo model answers a completion;
#   5. per shape: a random bf16 model (`generate-model`, kept in --work), then
#      bench-SHAPE.json (`llama-server bench`: prefill, time to first token, decode at batch
#      1/16/64) and transformers-SHAPE.json (the same measurements with transformers, eager);
#   6. report.md / report.json: the table, with ratios to the bandwidth ceiling and to
#      transformers, and the targets of docs/gpu.md (single-stream decode ≥ 60 % of the
#      ceiling, batch-64 decode ≥ 3× transformers).
#
# Exit status: 0 when everything ran and the goldens passed (targets are reported, not enforced
# unless --strict), 1 otherwise. `--device cpu --shapes tiny` runs the whole pipeline on a CPU.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; cat <<'EOF'
Options:
  --bundle DIR          bundle root (default: the directory above this script if it holds llama-server)
  --binary PATH         llama-server CUDA binary (default: BUNDLE/llama-server, or scripts/build-cuda.sh's)
  --tokenizer-dir DIR   tokenizer.json + tokenizer_config.json (default: BUNDLE/tokenizer)
  --goldens DIR         golden files (default: BUNDLE/goldens, or inference-server/tests/goldens)
  --device DEV          cuda, cuda:N or cpu (default cuda:0)
  --gpus N              also check the goldens with the layers split over N GPUs from DEV on
                        (default: the GPUs nvidia-smi lists; 1 on the CPU: no split check)
  --shapes LIST         model shapes (default llama-3.2-1b,llama-3.1-8b)
  --work DIR            where generated models are kept (default ${TMPDIR:-/tmp}/llama-gpu-check)
  --out DIR             results (default ./gpu-check-YYYYmmdd-HHMMSS)
  --python PATH         python with torch and transformers (default python3)
  --batch LIST          decode batch sizes (default 1,16,64)
  --prompt-tokens N     prompt length of decoding sequences (default 128)
  --decode-tokens N     decode steps measured (default 64)
  --prefill-tokens LIST prompt lengths for prefill / time to first token (default 128,512)
  --repeats N           measured runs per line, median reported (default 3)
  --skip-transformers   no transformers comparison
  --skip-serve          no serve smoke test
  --strict              exit 3 when a target is not met
EOF
}

bundle="" binary="" tokenizer="" goldens="" device=cuda:0 shapes=llama-3.2-1b,llama-3.1-8b
work=${TMPDIR:-/tmp}/llama-gpu-check out="" python=python3 batch=1,16,64 prompt_tokens=128
decode_tokens=64 prefill_tokens=128,512 repeats=3 skip_transformers=0 skip_serve=0 strict=0
gpus=
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --tokenizer-dir) tokenizer=$2; shift 2 ;;
    --goldens) goldens=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --shapes) shapes=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --prompt-tokens) prompt_tokens=$2; shift 2 ;;
    --decode-tokens) decode_tokens=$2; shift 2 ;;
    --prefill-tokens) prefill_tokens=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --skip-transformers) skip_transformers=1; shift ;;
    --skip-serve) skip_serve=1; shift ;;
    --strict) strict=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "==> gpu-check: $*" >&2; }
fail() { echo "gpu-check: FAILED: $*" >&2; exit 1; }

# Bundle layout (BUNDLE/scripts/gpu-check.sh) or the repository's (scripts/gpu-check.sh).
if [ -z "$bundle" ] && [ -x "$here/../llama-server" ]; then bundle=$(cd "$here/.." && pwd); fi
if [ -n "$bundle" ]; then
  binary=${binary:-$bundle/llama-server}
  tokenizer=${tokenizer:-$bundle/tokenizer}
  goldens=${goldens:-$bundle/goldens}
else
  repo=$(cd "$here/.." && pwd)
  cache=${LLAMA_OPERATOR_CACHE:-$HOME/.cache/llama-operator}
  binary=${binary:-${LLAMA_CUDA_TARGET_DIR:-$cache/cuda-target}/release/llama-server}
  goldens=${goldens:-$repo/inference-server/tests/goldens}
  tokenizer=${tokenizer:-$("$repo/scripts/setup-tokenizer.sh")}
fi
helper="$here/gpu/gpu_check.py"
[ -x "$binary" ] || fail "no llama-server binary at $binary (give --bundle or --binary)"
[ -f "$tokenizer/tokenizer.json" ] || fail "no tokenizer.json in $tokenizer"
[ -d "$goldens" ] || fail "no goldens directory $goldens"
[ -f "$helper" ] || fail "missing $helper"
out=${out:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
IFS=, read -r -a shape_list <<<"$shapes"
status=0

# The CUDA 13.0 runtime libraries (cudart, cuBLAS, cuRAND, NVRTC) of the host.
case "$device" in
  cpu) ;;
  *) for dir in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
       [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
     done ;;
esac

log "environment"
missing=$(ldd "$binary" | grep 'not found' || true)
[ -z "$missing" ] || fail "the binary's libraries do not resolve (is the CUDA 13.0 runtime installed? LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}):
$missing"
gpu="" driver=""
if command -v nvidia-smi >/dev/null; then
  gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 || true)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 || true)
  nvidia-smi >&2 || true
fi
"$python" - "$out/environment.json" "$gpu" "$driver" "$binary" <<'EOF'
import datetime, json, platform, sys
out, gpu, driver, binary = sys.argv[1:5]
json.dump({"gpu": gpu, "driver": driver, "binary": binary, "host": platform.node(),
           "date": datetime.datetime.now().isoformat(timespec="seconds")},
          open(out, "w"), indent=2)
EOF
"$binary" --version >&2
have_torch=1
"$python" -c 'import torch, transformers' 2>/dev/null || {
  have_torch=0
  log "no torch/transformers in $python: no bandwidth measurement, no transformers comparison"
}

torch_device=$device
[ "$device" = cuda ] && torch_device=cuda:0
bandwidth_args=()
if [ "$have_torch" = 1 ]; then
  log "bandwidth (torch device-to-device copy)"
  mib=1024
  [ "$device" = cpu ] && mib=256
  if "$python" "$helper" bandwidth --device "$torch_device" --mib "$mib" --json "$out/bandwidth.json"; then
    bandwidth_args=(--bandwidth-gbs "$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["gbs"])' "$out/bandwidth.json")")
  else
    status=1
  fi
fi

log "goldens on $device"
if ! "$binary" check-goldens --device "$device" --goldens "$goldens" --tokenizer-dir "$tokenizer" \
     --dtypes f32,bf16 --json "$out/goldens.json"; then
  status=1
fi
if [ -z "$gpus" ]; then
  gpus=1
  if [ "$device" != cpu ] && command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
    [ "$gpus" -ge 1 ] || gpus=1
  fi
fi
if [ "$gpus" -gt 1 ]; then
  log "goldens with the layers split over $gpus devices from $device"
  if ! "$binary" check-goldens --device "$device" --gpus "$gpus" --goldens "$goldens" \
       --tokenizer-dir "$tokenizer" --dtypes f32,bf16 --json "$out/goldens-split.json"; then
    status=1
  fi
fi

if [ "$skip_serve" = 0 ]; then
  log "serve --device $device with the demo model"
  "$python" "$helper" serve --binary "$binary" --device "$device" --tokenizer-dir "$tokenizer" \
    --json "$out/serve.json" || status=1
fi

bench_args=(--batch "$batch" --prompt-tokens "$prompt_tokens" --decode-tokens "$decode_tokens"
            --prefill-tokens "$prefill_tokens" --repeats "$repeats")
for shape in "${shape_list[@]}"; do
  model="$work/$shape-bf16-seed1"
  if [ ! -f "$model/.complete" ]; then
    log "generating the random $shape model (bf16) in $model"
    rm -rf "$model"
    "$binary" generate-model --shape "$shape" --seed 1 --dtype bf16 --out "$model" \
      --tokenizer-dir "$tokenizer" >/dev/null
    touch "$model/.complete"
  fi
  log "llama-server bench: $shape on $device"
  if ! "$binary" bench --device "$device" --model "$model" --dtype bf16 "${bench_args[@]}" \
       "${bandwidth_args[@]}" --json "$out/bench-$shape.json"; then
    status=1
  fi
  if [ "$have_torch" = 1 ] && [ "$skip_transformers" = 0 ]; then
    log "transformers: $shape on $device"
    "$python" "$helper" transformers --model "$model" --device "$torch_device" --dtype bf16 \
      "${bench_args[@]}" --json "$out/transformers-$shape.json" || status=1
  fi
done

log "report"
report_args=(--out-dir "$out" --shapes "$shapes")
[ "$strict" = 1 ] && report_args+=(--strict)
rc=0
"$python" "$helper" report "${report_args[@]}" || rc=$?
if [ "$rc" = 3 ] && [ "$status" = 0 ]; then status=3; elif [ "$rc" != 0 ]; then status=1; fi
log "results in $out (report.md)"
[ "$status" = 0 ] || echo "gpu-check: some steps FAILED (exit $status); see above and $out" >&2
exit "$status"
