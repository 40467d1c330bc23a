"""Writes docs/benchmarks/engine-vs-llama-cpp.md from the JSON of one
scripts/bench-vs-llamacpp.sh run: the machine, a table per quantization with both engines'
numbers and their ratios, the targets of issue #3, and the analysis kept in analysis.md
beside this file."""

import argparse
import datetime
import json
import os
import platform
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
# Peak RSS may exceed the model file plus the key/value cache by this much (issue #3).
RSS_SLACK_BYTES = 200 * 10**6


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def command_output(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine():
    cpu, cores = "unknown", str(os.cpu_count())
    for line in command_output(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            cpu = value.strip()
    flags = ""
    mem = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
                    flags = " ".join(w for w in wanted if w in have)
                    break
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                    break
    except OSError:
        pass
    return cpu, cores, mem, flags


def find(report, metric, batch=None, prompt=None):
    for m in report["measurements"]:
        if m["metric"] == metric and (batch is None or m["batch"] == batch) and (
            prompt is None or m["prompt_tokens"] == prompt
        ):
            return m
    return None


def mb(value):
    return f"{value / 1e6:,.0f} MB" if value is not None else "–"


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_ratio(r):
    return f"{r:.2f}×" if r is not None else "–"


def quant_section(quant, ours, theirs, batches, prefills):
    lines = [f"### {quant.upper()}", ""]
    lines.append(
        f"File `model-{quant}.gguf`: {mb(ours['model_file_bytes'])}; weights in memory: "
        f"llama-server {mb(ours['weight_bytes'])}, llama.cpp {mb(theirs['model_size_bytes'])}."
    )
    lines.append("")
    lines.append("| measurement | llama-server | llama.cpp | llama-server ÷ llama.cpp |")
    lines.append("| --- | ---: | ---: | ---: |")
    for batch in batches:
        o, t = find(ours, "decode", batch), find(theirs, "decode", batch)
        if not (o and t):
            continue
        name = "decode, 1 stream" if batch == 1 else f"aggregate decode, {batch} streams"
        lines.append(
            f"| {name} (tokens/s) | {o['tokens_per_second']:.2f} | {t['tokens_per_second']:.2f} "
            f"| {fmt_ratio(ratio(o['tokens_per_second'], t['tokens_per_second']))} |"
        )
    for prompt in prefills:
        o, t = find(ours, "prefill", prompt=prompt), find(theirs, "prefill", prompt=prompt)
        if o and t:
            lines.append(
                f"| prefill, {prompt}-token prompt (tokens/s) | {o['tokens_per_second']:.1f} "
                f"| {t['tokens_per_second']:.1f} "
                f"| {fmt_ratio(ratio(o['tokens_per_second'], t['tokens_per_second']))} |"
            )
    for prompt in prefills:
        o = find(ours, "time_to_first_token", prompt=prompt)
        t = find(theirs, "time_to_first_token", prompt=prompt)
        if o and t:
            # A time: the speed ratio is theirs over ours, so > 1 means llama-server is faster.
            lines.append(
                f"| time to first token, {prompt}-token prompt (s) | {o['seconds']:.2f} "
                f"| {t['seconds']:.2f} | {fmt_ratio(ratio(t['seconds'], o['seconds']))} speed |"
            )
    lines.append(
        f"| peak RSS | {mb(ours['peak_rss_bytes'])} | {mb(theirs['peak_rss_bytes'])} "
        f"| {fmt_ratio(ratio(ours['peak_rss_bytes'], theirs['peak_rss_bytes']))} memory |"
    )
    one_o, one_t = find(ours, "decode", 1), find(theirs, "decode", 1)
    eight_o, eight_t = find(ours, "decode", 8), find(theirs, "decode", 8)
    if one_o and eight_o and one_t and eight_t:
        lines.append(
            f"| 8 streams ÷ 1 stream | "
            f"{eight_o['tokens_per_second'] / one_o['tokens_per_second']:.2f}× | "
            f"{eight_t['tokens_per_second'] / one_t['tokens_per_second']:.2f}× | |"
        )
    longest = max(prefills)
    pre_o, pre_t = find(ours, "prefill", prompt=longest), find(theirs, "prefill", prompt=longest)
    if one_o and one_t and pre_o and pre_t:
        # Decoding N streams runs the same matrix products as prefilling N tokens; once the
        # batch is compute-bound its aggregate rate cannot pass the prefill rate.
        lines.append(
            f"| prefill ({longest}) ÷ decode, 1 stream: the most batching can gain "
            f"| {pre_o['tokens_per_second'] / one_o['tokens_per_second']:.2f}× "
            f"| {pre_t['tokens_per_second'] / one_t['tokens_per_second']:.2f}× | |"
        )
    lines.append("")
    lines.append(
        f"Key/value cache: llama-server {ours['kv_bytes_per_token'] / 1024:.0f} KiB a token "
        f"({ours.get('kv_dtype', 'f32')}), {mb(ours['kv_budget_bytes'])} for the largest measurement "
        f"({ours['kv_tokens']} tokens); llama.cpp allocates one unified f16 cache of "
        f"{theirs['n_ctx']} cells."
    )
    lines.append("")
    return lines


def targets(quant, ours, theirs, prefill_prompt):
    """(target, measured, met) rows of issue #3's targets for one quantization."""
    rows = []
    o1, t1 = find(ours, "decode", 1), find(theirs, "decode", 1)
    if o1 and t1:
        r = o1["tokens_per_second"] / t1["tokens_per_second"]
        rows.append((f"{quant}: single-stream decode ≥ 1.0× llama.cpp", f"{r:.2f}×", r >= 1.0))
    o8 = find(ours, "decode", 8)
    if o1 and o8:
        r = o8["tokens_per_second"] / o1["tokens_per_second"]
        rows.append((f"{quant}: aggregate decode at 8 streams ≥ 4× single stream", f"{r:.2f}×", r >= 4.0))
    op, tp = find(ours, "prefill", prompt=prefill_prompt), find(theirs, "prefill", prompt=prefill_prompt)
    if op and tp:
        r = op["tokens_per_second"] / tp["tokens_per_second"]
        rows.append((f"{quant}: prefill ({prefill_prompt} tokens) ≥ 0.8× llama.cpp", f"{r:.2f}×", r >= 0.8))
    if ours.get("peak_rss_bytes"):
        budget = ours["model_file_bytes"] + ours["kv_budget_bytes"] + RSS_SLACK_BYTES
        rows.append(
            (
                f"{quant}: peak RSS ≤ model file + KV budget + 200 MB",
                f"{mb(ours['peak_rss_bytes'])} vs {mb(budget)}",
                ours["peak_rss_bytes"] <= budget,
            )
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="directory of the runs' JSON files")
    parser.add_argument("--quants", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--rustc", required=True)
    parser.add_argument("--note", default="", help="a paragraph to print under the title")
    args = parser.parse_args()
    quants = [q for q in args.quants.split(",") if q]
    runs = {
        q: (read(os.path.join(args.raw, f"llama-server-{q}.json")),
            read(os.path.join(args.raw, f"llama-cpp-{q}.json")))
        for q in quants
    }
    first_ours, first_theirs = runs[quants[0]]
    batches = sorted({m["batch"] for m in first_ours["measurements"] if m["metric"] == "decode"})
    prefills = sorted({m["prompt_tokens"] for m in first_ours["measurements"] if m["metric"] == "prefill"})
    decode = find(first_ours, "decode")
    cpu, cores, mem, flags = machine()
    commit = command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    # The run's own outputs (the raw JSON it has just written, the results file) are not
    # changes to what was measured.
    own = [f":(exclude){os.path.abspath(path)}" for path in (args.raw, args.out)]
    if command_output(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *own]):
        commit += " (with uncommitted changes)"
    raw_dir = os.path.relpath(args.raw, os.path.dirname(os.path.abspath(args.out)))

    out = ["# llama-server vs llama.cpp on the CPU", ""]
    out.append(
        f"Produced by `{args.command}` on {datetime.date.today().isoformat()} "
        f"(llama-server at {commit}); the raw numbers of every run are in "
        f"[`{raw_dir}/`]({raw_dir}/). Issue #3 asked for this comparison."
    )
    if args.note:
        out += ["", f"**Note.** {args.note}"]
    out += ["", "## Machine", ""]
    out.append(f"- CPU: {cpu}, {cores} cores ({flags}); memory {mem}; Linux {platform.release()}")
    out.append(f"- {args.rustc}; llama-server {first_ours['device']}, {first_ours['threads']} threads")
    out.append(
        f"- llama.cpp: ggml {first_theirs['ggml_version']} (commit {first_theirs['ggml_commit']}) "
        f"from llama-cpp-python {first_theirs['llama_cpp_python']}, built from source with "
        f"`GGML_NATIVE=ON` (scripts/setup-llamacpp-venv.sh), {first_theirs['threads']} threads; "
        f"`{first_theirs['system_info']}`"
    )
    out += ["", "## What was measured", ""]
    out.append(
        f"The Llama-3.2-1B-shaped model ({first_ours['parameters'] / 1e9:.3f} B parameters, "
        "random weights, the real Llama 3 tokenizer) written by `llama-server generate-model "
        "--shape llama-3.2-1b --gguf …`; both engines read the same GGUF file, each in its own "
        "process, with the same thread count, prompt lengths and number of decode steps. "
        "Each number is the median of "
        f"{first_ours['repeats']} runs after one unrecorded warm-up run (decode: windows)."
    )
    out.append("")
    steps = decode["tokens"] // decode["batch"] if decode else "?"
    out.append(
        f"- **decode**: N streams, each with a {decode['prompt_tokens'] if decode else '?'}-token "
        "prompt, prefilled once (not timed; llama-server feeds at most 512 prompt tokens a "
        "forward call, as its server does, llama.cpp one prompt a `llama_decode`); then a warm-up window and "
        f"{first_ours['repeats']} timed windows of {steps} steps follow one another on the same "
        "streams (so the context grows from the prompt by one window each), every step feeding "
        "one token of every stream and sampling the next (greedy). Aggregate tokens/s counts "
        "every stream. llama-server: `llama-server bench` steps its scheduler's sequences through "
        "batched forward calls. llama.cpp: one `llama_decode` of a `llama_batch` holding one "
        "token per sequence (its own `seq_id` and position; `n_seq_max` = the largest N, one "
        "unified key/value cache) and `llama_sampler_sample` with the greedy sampler for each "
        "— the continuous batching llama.cpp's own server does."
    )
    out.append(
        "- **prefill** and **time to first token**: one prompt until its first token is sampled, "
        "in one forward call (llama-server's 512-token prefill chunk holds the longest prompt; "
        "llama.cpp: one `llama_decode` with `n_ubatch` ≥ the prompt, logits of the last token "
        "only)."
    )
    out.append(
        "- **peak RSS**: the process's `VmHWM` at the end of its run (loading and every "
        "measurement; llama.cpp's includes the Python interpreter, about 20 MB, and the file "
        "pages it maps)."
    )
    out.append(
        "- llama.cpp runs with its defaults otherwise: the file memory-mapped, flash attention "
        f"`auto` (on for the CPU), f16 key/value cache; llama-server computes in "
        f"{first_ours['dtype']} with an {first_ours.get('kv_dtype', first_ours['dtype'])} "
        "key/value cache (`engine.kvCacheDtype: auto`); Q8_0, Q4_K and "
        "Q6_K matrices are multiplied by the engine's own kernels (AVX2; AVX-VNNI or AVX-512 "
        "VNNI for Q8_0, AVX-512 VNNI/BW for Q4_K and Q6_K where the CPU has them) over one "
        "copy of the "
        "weights, interleaved at load time (Q8_0 in blocks of four rows, K-quants of eight), "
        "up to eight activation rows a call (Q8_0 on AVX2 without either VNNI: passes of "
        "four; with AVX-512 VNNI at eight activation rows two adjacent groups a pass: "
        "sixteen K-quant rows, eight Q8_0 rows), on "
        "its own kernel threads (`inference-server/src/engine/q8_0.rs`, `kquants_x8/`; "
        "threads: `cpu_pool.rs`); attention runs in the engine's own kernels, one pass over "
        "the cache in place (`cpu_prefill_attention.rs` with `cpu_prefill_tiles.rs` for "
        "prompts, `cpu_decode_kernel.rs` for decoding tokens)."
    )
    out += ["", "## Results", ""]
    for q in quants:
        out += quant_section(q, *runs[q], batches, prefills)
    out += ["## Targets", "", "| target | measured | met |", "| --- | ---: | :---: |"]
    prefill_prompt = 512 if 512 in prefills else max(prefills)
    for q in quants:
        for name, measured, met in targets(q, *runs[q], prefill_prompt):
            out.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    out.append("")
    analysis = os.path.join(HERE, "analysis.md")
    if os.path.exists(analysis):
        with open(analysis, encoding="utf-8") as f:
            out += [f.read().rstrip(), ""]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
