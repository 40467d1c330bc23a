"""Time to first token with and without llama-server's prefix cache (scripts/bench-prefix-cache.sh).

Starts the release `llama-server` twice on the same model file, once with `engine.prefixCache`
on (the default) and once off, one after the other, and sends each the same chat workload over
HTTP (streamed, greedy, `ignore_eos`):

- turn 1: a long system prompt (unique to the round) and a question;
- turn 2: the same conversation, the answer and a follow-up question (a chat's next turn);
- turn 3: a new conversation with the same system prompt (an application's next user);
- a new system prompt asked for `n` = 4 choices (time until all four started).

Every round starts with a system prompt no earlier round used, so nothing carries over between
rounds. Reports the median time to first token of each turn for both servers and the ratio,
with the prompt tokens each reused (`usage.prompt_tokens_details.cached_tokens`).
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompt(round_index: int, rules: int) -> str:
    lines = [f"You are the help desk of workshop {round_index}. Follow these rules."]
    for k in range(1, rules + 1):
        lines.append(f"Rule {k}: questions about part {k * 7 + round_index} are answered from "
                     f"handbook section {k}, politely, in at most {k % 5 + 2} sentences.")
    return "\n".join(lines)


class Server:
    def __init__(self, binary: str, model: str, tokenizer: str, prefix_cache: bool, workdir: Path,
                 engine: dict | None = None):
        config = {
            "modelName": "Llama-3.2-1B-Instruct",
            "modelPath": model,
            "tokenizerDir": tokenizer,
            "auth": {"mode": "none"},
            "engine": {**(engine or {}), "prefixCache": prefix_cache},
        }
        path = workdir / f"server-{prefix_cache}.yaml"
        path.write_text(json.dumps(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"server-{prefix_cache}.log", "wb")
        self.process = subprocess.Popen(
            [binary, "serve", "--config", str(path), "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("llama-server did not become ready")

    def chat(self, messages: list, max_tokens: int, n: int = 1) -> tuple[float, str, dict]:
        """Streams one request: (seconds until every choice has its first content, the choices'
        texts, usage)."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}, "n": n}
        start = time.perf_counter()
        first: dict[int, float] = {}
        texts: dict[int, list[str]] = {}
        usage = {}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=900) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    content = choice["delta"].get("content") or ""
                    if content and choice["index"] not in first:
                        first[choice["index"]] = time.perf_counter() - start
                    texts.setdefault(choice["index"], []).append(content)
                if chunk.get("usage"):
                    usage = chunk["usage"]
        started = max(first.values()) if len(first) == n else time.perf_counter() - start
        return started, "\x1e".join("".join(texts[i]) for i in sorted(texts)), usage

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def workload(server: Server, rounds: int, rules: int, answer_tokens: int) -> list[dict]:
    results = []
    for i in range(rounds):
        system = {"role": "system", "content": system_prompt(i, rules)}
        first = [system, {"role": "user", "content": "Which section covers part 15?"}]
        t1, answer, u1 = server.chat(first, answer_tokens)
        second = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "And how many sentences may that answer have?"}]
        t2, answer2, u2 = server.chat(second, answer_tokens)
        third = [system, {"role": "user", "content": "Who answers questions about part 22?"}]
        t3, answer3, u3 = server.chat(third, answer_tokens)
        fourth = [{"role": "system", "content": system_prompt(1000 + i, rules)},
                  {"role": "user", "content": "Name three parts."}]
        t4, answer4, u4 = server.chat(fourth, answer_tokens, n=4)
        usages = [u1, u2, u3, u4]
        results.append({"ttft": [t1, t2, t3, t4], "usage": usages,
                        "text": [answer, answer2, answer3, answer4]})
        print(f"  round {i + 1}: ttft {t1:.2f} / {t2:.2f} / {t3:.2f} / {t4:.2f} s, cached "
              f"{[u.get('prompt_tokens_details', {}).get('cached_tokens') for u in usages]}",
              file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rules", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", default="scripts/bench-prefix-cache.sh")
    args = parser.parse_args()

    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for on in (True, False):
            print(f"== prefix cache {'on' if on else 'off'}", file=sys.stderr)
            server = Server(args.server, args.model, args.tokenizer_dir, on, Path(tmp))
            try:
                server.chat([{"role": "user", "content": "Warm up."}], 4)
                measured[on] = workload(server, args.rounds, args.rules, args.answer_tokens)
            finally:
                server.stop()

    same = [sum(r["text"][t] == o["text"][t] for r, o in zip(measured[True], measured[False]))
            for t in range(4)]

    turns = ["turn 1: new system prompt and question",
             "turn 2: the conversation so far and a follow-up",
             "turn 3: the same system prompt, a new conversation",
             "a new system prompt, `n` = 4 choices (until all four started)"]
    rows = []
    for t, name in enumerate(turns):
        on = statistics.median(r["ttft"][t] for r in measured[True])
        off = statistics.median(r["ttft"][t] for r in measured[False])
        prompt = statistics.median(r["usage"][t]["prompt_tokens"] for r in measured[True])
        cached = statistics.median(
            r["usage"][t]["prompt_tokens_details"]["cached_tokens"] for r in measured[True])
        off_cached = max(
            r["usage"][t]["prompt_tokens_details"]["cached_tokens"] for r in measured[False])
        if off_cached:
            raise SystemExit(f"the server without the cache reported {off_cached} cached tokens")
        rows.append(f"| {name} | {prompt:.0f} | {cached:.0f} | {off:.2f} | {on:.2f} | {off / on:.2f}× "
                    f"| {same[t]} of {len(measured[True])} |")

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"""# Prefix cache: time to first token

Produced by `{args.command}` on {time.strftime('%Y-%m-%d')}: the release `llama-server` on
`{Path(args.model).name}` ({cpu}, {os.cpu_count()} threads, {platform.system()}), started
twice in the same run, once with `engine.prefixCache: true` (the default) and once with
`false`; the same streamed, greedy chat workload ({args.answer_tokens}-token answers,
`ignore_eos`) over HTTP to each. Medians of {args.rounds} rounds; each round's system prompt
({args.rules} rules) is new, so nothing carries over between rounds.

| request | prompt tokens | reused from the cache | time to first token, cache off (s) | cache on (s) | off ÷ on | same answer on and off |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

Turn 2 reuses the first prompt and the answer (the tokens the engine generated, as far as the
conversation re-encodes to them); turn 3 reuses the system prompt, copied from the kept
conversation, which stays for later turns. The `n` = 4 request's choices are four sequences
with one prompt: with the cache off all four compute it, sharing the steps' prompt budget, so
all four start late; with it on, the others wait for the first one's prefill and copy it (its
"reused" count is the most any choice reused).

Prompt tokens reused from an earlier prompt are the same keys and values a prefill computes,
bit for bit (a prompt fed in any chunks gives the same ones), so turn 3 answers as without the
cache. The answer tokens turn 2 reuses were computed one at a time by the decode path, whose
arithmetic rounds differently; with quantized weights a rounding difference can flip an
activation's 8-bit quantization, and on random weights, whose next-token scores are nearly
tied, that can change a greedy token (the "same answer" column). The inference-server README's
prefix cache section has the measurement.
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
