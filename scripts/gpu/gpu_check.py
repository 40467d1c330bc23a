#!/usr/bin/env python3
"""The Python half of scripts/gpu/gpu-check.sh: what needs torch, transformers or HTTP.

Subcommands (each writes one JSON file):
  bandwidth     device-to-device copy bandwidth with torch (read + write bytes per second)
  transformers  Hugging Face transformers on a model directory: prefill / time to first token
                and decode throughput at the same batch sizes and lengths as `llama-server bench`
  serve         starts `llama-server serve` on the device with the demo model, waits for
                readiness and asks for one chat completion
  report        the table: llama-server against the bandwidth ceiling and against transformers,
                with the targets of docs/gpu.md; written as Markdown and JSON

Only the standard library is needed for `serve` and `report`.
"""

import argparse
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# Targets of docs/gpu.md.
SINGLE_STREAM_CEILING_TARGET = 0.60
BATCH64_TRANSFORMERS_TARGET = 3.0


def write_json(path, value):
    pathlib.Path(path).write_text(json.dumps(value, indent=2) + "\n")


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- bandwidth -------------------------------------------------------------------------------


def cmd_bandwidth(args):
    import torch

    device = torch.device(args.device)
    size = args.mib << 20
    src = torch.empty(size // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(torch, device)
    best = 0.0
    for _ in range(args.trials):
        started = time.perf_counter()
        for _ in range(args.iterations):
            dst.copy_(src)
        sync(torch, device)
        seconds = time.perf_counter() - started
        # A copy reads and writes every byte.
        best = max(best, 2 * size * args.iterations / seconds / 1e9)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": str(device),
        "name": name,
        "bytes": size,
        "iterations": args.iterations,
        "gbs": best,
        "torch": torch.__version__,
    }
    write_json(args.json, result)
    print(f"bandwidth: {best:.0f} GB/s device-to-device copy on {name}")


# --- transformers ----------------------------------------------------------------------------


def load_model(model_dir, device, dtype):
    import torch
    from transformers import LlamaForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    try:
        model = LlamaForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="eager"
        )
    except TypeError:  # transformers 4.x names it torch_dtype
        model = LlamaForCausalLM.from_pretrained(
            model_dir, torch_dtype=torch_dtype, attn_implementation="eager"
        )
    return model.to(device).eval()


def cmd_transformers(args):
    import torch
    import transformers

    device = torch.device(args.device)
    model = load_model(args.model, device, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = min(model.config.vocab_size, 128_000)

    def prompts(batch, length):
        return torch.randint(0, vocab, (batch, length), generator=generator).to(device)

    def generate_seconds(ids, new_tokens):
        mask = torch.ones_like(ids)
        sync(torch, device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                pad_token_id=0,
            )
        sync(torch, device)
        seconds = time.perf_counter() - started
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
        return seconds

    def median(measure):
        measure()  # warm-up, not recorded
        return statistics.median(measure() for _ in range(args.repeats))

    measurements = []
    for length in args.prefill_tokens:
        ids = prompts(1, length)
        seconds = median(lambda: generate_seconds(ids, 1))
        for metric, tokens in (("prefill", length), ("time_to_first_token", 1)):
            measurements.append(
                {
                    "metric": metric,
                    "batch": 1,
                    "prompt_tokens": length,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_second": tokens / seconds,
                }
            )
        print(f"transformers: prefill {length} tokens: {seconds * 1000:.1f} ms", flush=True)
    for batch in args.batch:
        ids = prompts(batch, args.prompt_tokens)
        # generate() always prefills: decode time is the difference between D+1 new tokens and 1.
        first = median(lambda: generate_seconds(ids, 1))
        full = median(lambda: generate_seconds(ids, args.decode_tokens + 1))
        seconds = max(full - first, 1e-9)
        measurements.append(
            {
                "metric": "decode",
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "tokens": batch * args.decode_tokens,
                "seconds": seconds,
                "tokens_per_second": batch * args.decode_tokens / seconds,
                "per_stream_tokens_per_second": args.decode_tokens / seconds,
            }
        )
        print(
            f"transformers: decode batch {batch}: {batch * args.decode_tokens / seconds:.1f} tok/s",
            flush=True,
        )
    write_json(
        args.json,
        {
            "model": args.model,
            "device": str(device),
            "dtype": args.dtype,
            "attention": "eager",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "repeats": args.repeats,
            "measurements": measurements,
        },
    )


# --- serve -----------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return None, str(err)


def cmd_serve(args):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        config = pathlib.Path(scratch) / "server.yaml"
        config.write_text("auth:\n  mode: none\n")
        env = dict(os.environ, LLAMA_SERVER_TOKENIZER_DIR=args.tokenizer_dir, RUST_LOG="info")
        log = open(pathlib.Path(scratch) / "server.log", "w+")
        server = subprocess.Popen(
            [args.binary, "serve", "--device", args.device, "--config", str(config),
             "--listen", f"127.0.0.1:{port}"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        result = {"device": args.device, "ready": False, "completion": None, "error": None}
        try:
            deadline = time.monotonic() + args.timeout
            started = time.monotonic()
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    result["error"] = f"llama-server exited with {server.returncode}"
                    break
                status, _ = http("GET", f"{base}/health/ready", timeout=5)
                if status == 200:
                    result["ready"] = True
                    result["ready_seconds"] = time.monotonic() - started
                    break
                time.sleep(0.5)
            else:
                result["error"] = f"not ready within {args.timeout} s"
            if result["ready"]:
                body = {"messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 16, "temperature": 0}
                t0 = time.monotonic()
                status, text = http("POST", f"{base}/chat/completions", body, timeout=120)
                result["completion_seconds"] = time.monotonic() - t0
                if status == 200:
                    answer = json.loads(text)
                    result["completion"] = answer["choices"][0]["message"]["content"]
                    result["usage"] = answer.get("usage")
                else:
                    result["error"] = f"chat completion answered {status}: {text[:500]}"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.seek(0)
            result["log_tail"] = log.read()[-4000:]
            log.close()
    write_json(args.json, result)
    ok = result["ready"] and result["error"] is None
    print(f"serve on {args.device}: " + (
        f"ready in {result['ready_seconds']:.1f} s; completion in "
        f"{result['completion_seconds']:.2f} s: {result['completion']!r}" if ok
        else f"FAILED: {result['error']}\n{result['log_tail']}"))
    sys.exit(0 if ok else 1)


# --- report ----------------------------------------------------------------------------------


def load(path):
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def find(measurements, metric, batch, prompt=None):
    for m in measurements or []:
        if m["metric"] == metric and m["batch"] == batch and (
            prompt is None or m["prompt_tokens"] == prompt
        ):
            return m
    return None


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def cmd_report(args):
    out = pathlib.Path(args.out_dir)
    bandwidth = load(out / "bandwidth.json")
    goldens = load(out / "goldens.json")
    serve = load(out / "serve.json")
    gbs = bandwidth["gbs"] if bandwidth else None
    lines = ["# llama-server GPU check", ""]
    env = load(out / "environment.json") or {}
    for key in ("gpu", "driver", "binary", "host", "date"):
        if env.get(key):
            lines.append(f"- {key}: {env[key]}")
    if bandwidth:
        lines.append(
            f"- bandwidth: {gbs:.0f} GB/s device-to-device copy on {bandwidth['name']} "
            f"(torch {bandwidth['torch']})"
        )
    else:
        lines.append("- bandwidth: not measured (no ceiling ratios)")
    if not goldens:
        lines.append("- goldens: did not run (see the log)")
    split = load(out / "goldens-split.json")
    for report in [goldens, split]:
        if not report:
            continue
        verdict = "passed" if all(m["passed"] for m in report["models"]) else "FAILED"
        where = report["device"]
        if report.get("gpus", 1) > 1:
            where += f", layers split over {report['gpus']} devices"
        lines.append(f"- goldens on {where}: {verdict}")
        for m in report["models"]:
            worst = max(p["max_logit_diff"] for p in m["prompts"])
            alone = sum(p["greedy_alone_matching"] for p in m["prompts"])
            total = sum(p["greedy_tokens"] for p in m["prompts"])
            margin = max(p["worst_margin"] for p in m["prompts"])
            lines.append(
                f"  - {m['golden']} {m['dtype']}: max |Δlogit| {worst:.2e} "
                f"(tolerance {m['logit_tolerance']:.0e}), greedy {alone}/{total} identical, "
                f"worst teacher-forced margin {margin:.2e}: {'ok' if m['passed'] else 'FAILED'}"
            )
    if serve:
        if serve.get("error") is None and serve.get("ready"):
            lines.append(
                f"- serve on {serve['device']}: ready in {serve['ready_seconds']:.1f} s, a chat "
                f"completion in {serve['completion_seconds']:.2f} s"
            )
        else:
            lines.append(f"- serve on {serve['device']}: FAILED: {serve.get('error')}")
    lines.append("")
    lines.append(
        "| shape | measurement | llama-server | per stream | % of ceiling | transformers "
        "| × transformers |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    targets = []
    summary = {"bandwidth_gbs": gbs, "shapes": {}}
    for shape in args.shapes:
        ours = load(out / f"bench-{shape}.json")
        theirs = load(out / f"transformers-{shape}.json")
        if ours is None:
            lines.append(f"| {shape} | (llama-server bench did not run) | | | | | |")
            continue
        weight_bytes = ours["weight_bytes"]
        ceiling = gbs * 1e9 / weight_bytes if gbs else None
        ours_m = ours["measurements"]
        theirs_m = theirs["measurements"] if theirs else None
        rows = []
        for m in ours_m:
            if m["metric"] != "prefill":
                continue
            p = m["prompt_tokens"]
            t = find(theirs_m, "prefill", 1, p)
            rows.append((f"prefill {p} tokens (tok/s)", m["tokens_per_second"], None, None,
                         t and t["tokens_per_second"], "higher"))
            rows.append((f"time to first token, {p}-token prompt (ms)", 1000 * m["seconds"],
                         None, None, t and 1000 * t["seconds"], "lower"))
        for m in ours_m:
            if m["metric"] != "decode":
                continue
            b = m["batch"]
            t = find(theirs_m, "decode", b)
            per_stream = m["per_stream_tokens_per_second"]
            fraction = per_stream / ceiling if ceiling else None
            label = "decode, single stream (tok/s)" if b == 1 else f"decode, batch {b} (tok/s)"
            rows.append((label, m["tokens_per_second"], per_stream, fraction,
                         t and t["tokens_per_second"], "higher"))
            if b == 1:
                targets.append((shape, f"single-stream decode ≥ {SINGLE_STREAM_CEILING_TARGET:.0%}"
                                f" of the bandwidth ceiling ({fmt(ceiling, '.0f')} tok/s)",
                                fraction, SINGLE_STREAM_CEILING_TARGET, "%"))
            if b == 64:
                ratio = m["tokens_per_second"] / t["tokens_per_second"] if t else None
                targets.append((shape, f"batch-64 decode ≥ {BATCH64_TRANSFORMERS_TARGET:.0f}× "
                                "transformers", ratio, BATCH64_TRANSFORMERS_TARGET, "×"))
        shape_summary = {"weight_bytes": weight_bytes, "ceiling_tokens_per_second": ceiling,
                         "rows": []}
        for label, value, per_stream, fraction, hf, better in rows:
            if hf:
                ratio = value / hf if better == "higher" else hf / value
            else:
                ratio = None
            lines.append(
                f"| {shape} | {label} | {fmt(value, ',.1f')} | {fmt(per_stream, ',.1f')} "
                f"| {fmt(fraction and 100 * fraction, '.1f')} | {fmt(hf, ',.1f')} "
                f"| {fmt(ratio, '.2f')} |"
            )
            shape_summary["rows"].append({"measurement": label, "llama_server": value,
                                          "per_stream": per_stream, "ceiling_fraction": fraction,
                                          "transformers": hf, "speedup": ratio})
        summary["shapes"][shape] = shape_summary
        if ceiling:
            lines.append(
                f"| {shape} | bandwidth ceiling ({weight_bytes / 1e9:.2f} GB of weights) "
                f"| {ceiling:,.1f} | | 100.0 | | |"
            )
    lines.append("")
    lines.append("Targets (docs/gpu.md):")
    met_all = True
    summary["targets"] = []
    for shape, text, value, goal, unit in targets:
        met = value is not None and value >= goal
        met_all &= met
        shown = "-" if value is None else (f"{100 * value:.1f}%" if unit == "%" else f"{value:.2f}×")
        lines.append(f"- {shape}: {text}: {shown}: {'met' if met else 'NOT MET'}")
        summary["targets"].append({"shape": shape, "target": text, "value": value, "met": met})
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    write_json(out / "report.json", summary)
    print(text, end="")
    if args.strict and not met_all:
        sys.exit(3)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bandwidth")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", required=True)
    p.set_defaults(run=cmd_bandwidth)

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p = sub.add_parser("transformers")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--batch", type=ints, default=[1, 16, 64])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=ints, default=[128, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", required=True)
    p.set_defaults(run=cmd_transformers)

    p = sub.add_parser("serve")
    p.add_argument("--binary", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--json", required=True)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("report")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--shapes", type=lambda t: [s for s in t.split(",") if s], required=True)
    p.add_argument("--strict", action="store_true", help="exit 3 when a target is not met")
    p.set_defaults(run=cmd_report)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
