"""llama.cpp's side of the engine comparison (scripts/bench-vs-llamacpp.sh).

Measures a GGUF file through llama.cpp's own C API (the low-level `llama_cpp` bindings of
llama-cpp-python), the way `llama-server bench` measures our engine, and writes JSON in the
same shape:

- prefill: one prompt of each --prefill-tokens length in one llama_decode, until its first
  token is sampled (llama.cpp's greedy sampler); also the time to first token;
- decode: --batch sequences, each with a --prompt-tokens prompt, prefilled once (not timed);
  then one warm-up window and --repeats timed windows of --decode-tokens steps follow one
  another, each step one llama_batch holding one token of every sequence (its own seq_id and
  position) and a greedy sample of every sequence: llama.cpp's continuous batching, as its
  server's slots drive it, with one unified key/value cache.

Each line is the median of --repeats runs after one unrecorded warm-up run. The peak resident
set is this process's VmHWM at the end.
"""

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time

import llama_cpp as lc

# Prompt tokens are drawn below this id: the Llama 3 vocabulary's ordinary tokens.
ORDINARY_TOKENS = 128_000


def parse_list(text):
    return [int(part) for part in text.split(",") if part]


def peak_rss_bytes():
    """VmHWM of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    return int(value) * 1024 if unit == "kB" else None
    except OSError:
        return None
    return None


def ggml_version():
    """ggml's version and commit, read from the library llama-cpp-python loaded."""
    lib_dir = os.path.join(os.path.dirname(lc.__file__), "lib")
    try:
        ggml = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
        ggml.ggml_version.restype = ctypes.c_char_p
        ggml.ggml_commit.restype = ctypes.c_char_p
        return ggml.ggml_version().decode(), ggml.ggml_commit().decode()
    except (OSError, AttributeError):
        return None, None


class Batch:
    """A llama_batch of up to `capacity` tokens, each in one sequence."""

    def __init__(self, capacity):
        self.raw = lc.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity

    def fill(self, entries):
        """entries: (token, position, seq_id, wants_logits) tuples."""
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} tokens exceed a batch of {self.capacity}")
        raw = self.raw
        for i, (token, pos, seq, logits) in enumerate(entries):
            raw.token[i] = token
            raw.pos[i] = pos
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = seq
            raw.logits[i] = 1 if logits else 0
        raw.n_tokens = len(entries)

    def free(self):
        lc.llama_batch_free(self.raw)


class Bench:
    def __init__(self, args):
        self.args = args
        lc.llama_backend_init()
        # llama.cpp logs every load detail to stderr; keep warnings and errors only.
        lc.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(args.model.encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {args.model}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        longest_decode = max(args.batch) * self.decode_length()
        self.n_ctx = -(-max(longest_decode, max(args.prefill_tokens)) // 256) * 256
        ctx_params = lc.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx
        ctx_params.n_batch = max(2048, max(args.prefill_tokens))
        ctx_params.n_ubatch = max(512, max(args.prefill_tokens))
        ctx_params.n_seq_max = max(args.batch)
        ctx_params.kv_unified = True
        ctx_params.n_threads = args.threads
        ctx_params.n_threads_batch = args.threads
        self.ctx_params = ctx_params
        self.ctx = lc.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise SystemExit("llama.cpp cannot create a context")
        self.memory = lc.llama_get_memory(self.ctx)
        self.sampler = lc.llama_sampler_init_greedy()
        self.batch = Batch(max(longest_decode, max(args.prefill_tokens), max(args.batch)))
        vocab_size = lc.llama_vocab_n_tokens(self.vocab)
        self.token_limit = min(vocab_size, ORDINARY_TOKENS)

    def decode_length(self):
        """Tokens a decode sequence ends with (prompt, first sample, every window)."""
        args = self.args
        return args.prompt_tokens + 1 + (args.repeats + 1) * args.decode_tokens

    def prompt(self, index, length):
        rng = random.Random(f"{self.args.seed}-bench-prompt-{index}")
        return [rng.randrange(self.token_limit) for _ in range(length)]

    def decode(self):
        status = lc.llama_decode(self.ctx, self.batch.raw)
        if status != 0:
            raise SystemExit(f"llama_decode failed with status {status}")

    def prefill(self, length):
        lc.llama_memory_clear(self.memory, True)
        tokens = self.prompt(0, length)
        self.batch.fill([(t, p, 0, p == length - 1) for p, t in enumerate(tokens)])
        started = time.perf_counter()
        self.decode()
        lc.llama_sampler_sample(self.sampler, self.ctx, -1)
        return time.perf_counter() - started

    def decode_runs(self, batch, prompt, steps, repeats):
        """The seconds of each timed window (after the prefill and a warm-up window)."""
        lc.llama_memory_clear(self.memory, True)
        last = []
        for seq in range(batch):
            tokens = self.prompt(seq, prompt)
            self.batch.fill([(t, p, seq, p == prompt - 1) for p, t in enumerate(tokens)])
            self.decode()
            last.append(lc.llama_sampler_sample(self.sampler, self.ctx, -1))
        position = prompt

        def window():
            nonlocal last, position
            started = time.perf_counter()
            for _ in range(steps):
                self.batch.fill([(last[s], position, s, True) for s in range(batch)])
                self.decode()
                last = [lc.llama_sampler_sample(self.sampler, self.ctx, s) for s in range(batch)]
                position += 1
            return time.perf_counter() - started

        window()
        return [window() for _ in range(repeats)]

    def timed_runs(self, measure):
        measure()
        return [measure() for _ in range(self.args.repeats)]

    def run(self):
        args = self.args
        measurements = []
        for length in args.prefill_tokens:
            runs = self.timed_runs(lambda: self.prefill(length))
            seconds = statistics.median_high(runs)
            print(f"llama.cpp prefill {length}: {seconds:.3f} s", file=sys.stderr)
            for metric, tokens in (("prefill", length), ("time_to_first_token", 1)):
                measurements.append(measurement(metric, 1, length, tokens, seconds, runs))
        for batch in args.batch:
            runs = self.decode_runs(batch, args.prompt_tokens, args.decode_tokens, args.repeats)
            seconds = statistics.median_high(runs)
            print(f"llama.cpp decode batch {batch}: {seconds:.3f} s", file=sys.stderr)
            m = measurement(
                "decode", batch, args.prompt_tokens, batch * args.decode_tokens, seconds, runs
            )
            m["per_stream_tokens_per_second"] = args.decode_tokens / seconds
            measurements.append(m)
        version, commit = ggml_version()
        return {
            "engine": "llama.cpp",
            "model": args.model,
            "llama_cpp_python": lc.__version__,
            "ggml_version": version,
            "ggml_commit": commit,
            "system_info": lc.llama_print_system_info().decode().strip(),
            "threads": args.threads,
            "n_ctx": self.n_ctx,
            "n_seq_max": self.ctx_params.n_seq_max,
            "kv_unified": True,
            "flash_attn_type": self.ctx_params.flash_attn_type,
            "type_k": self.ctx_params.type_k,
            "type_v": self.ctx_params.type_v,
            "model_size_bytes": lc.llama_model_size(self.model),
            "model_file_bytes": os.path.getsize(args.model),
            "repeats": args.repeats,
            "measurements": measurements,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def close(self):
        self.batch.free()
        lc.llama_sampler_free(self.sampler)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def measurement(metric, batch, prompt, tokens, seconds, runs):
    return {
        "metric": metric,
        "batch": batch,
        "prompt_tokens": prompt,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "per_stream_tokens_per_second": tokens / seconds,
        "runs_seconds": runs,
    }


@lc.llama_log_callback
def _quiet_log(level, text, _user_data):
    # ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation.
    if level in (3, 4):
        sys.stderr.write(text.decode(errors="replace"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the .gguf file")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch", type=parse_list, default=[1, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=parse_list, default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args()
    if args.repeats < 1 or args.decode_tokens < 1 or min(args.batch) < 1:
        parser.error("--repeats, --decode-tokens and every --batch must be at least 1")
    bench = Bench(args)
    report = bench.run()
    bench.close()
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=2)
        out.write("\n")


if __name__ == "__main__":
    main()
