#!/usr/bin/env python3
"""Reference goldens for llama-server's engine, computed with Hugging Face transformers + torch.

For each tiny shape, this script
  1. generates the random-weight model with `llama-server generate-model` (same seed as the
     Rust tests),
  2. loads it with transformers' LlamaForCausalLM in float32 on the CPU,
  3. records, for a few prompts (plain text and chat-templated): the prompt token ids, the
     rendered chat prompt, f32 logits at a fixed set of vocabulary ids for every prompt
     position, the top-10 logits at the last position, and a 64-step greedy continuation,
and writes one small JSON file per shape under inference-server/tests/goldens/. It also
renders a feature-heavy chat template with transformers' own Jinja environment, so the Rust
renderer can be compared with it.

The Rust tests only read these files; they never need torch.

Usage:
    cargo build -p llama-server
    "$(scripts/reference/setup-venv.sh)" scripts/reference/make_goldens.py \
        [--llama-server target/debug/llama-server] [--tokenizer-dir DIR]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "inference-server" / "tests" / "goldens"

# Must match inference-server/tests/common/mod.rs.
SHAPES = [("tiny", 42), ("tiny-untied", 7)]
GREEDY_STEPS = 64
VOCAB = 128256
LOGIT_IDS = list(range(0, VOCAB, 4001)) + [128000, 128001, 128009]
PROMPTS = [
    {"name": "plain_short", "text": "The capital of France is"},
    {"name": "plain_unicode", "text": "Grüße aus Köln! 東京 and 12345 numbers, emoji 🦙 ok?"},
    {
        "name": "chat",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three colours of the rainbow."},
        ],
    },
    {
        "name": "chat_multi_turn",
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Count to five, please."},
        ],
    },
]

# A template using what real Llama 3.x templates use: bos_token, `is defined`, slicing,
# `in`, raise_exception, loop controls, string methods, filters, tojson with and without
# indent, trim_blocks/lstrip_blocks whitespace handling.
FEATURE_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
Today Date: {{ date_string }}
{% if tools is not none %}
Tools:
{% for t in tools %}
    {{ t | tojson(indent=4) }}
{% endfor %}
{% endif %}
{{ system_message }}<|eot_id|>
{% for message in messages %}
    {% if message.role == 'skip' %}{% continue %}{% endif %}
    {% if 'tool_calls' in message %}
        {%- set call = message.tool_calls[0].function %}
<|start_header_id|>assistant<|end_header_id|>

{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>
    {%- elif message.role == 'stop' %}
        {%- break %}
    {%- else %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'].strip() | replace("  ", " ") }}{% if not loop.last %}<|eot_id|>{% endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{%- if messages | length > 6 %}{{ raise_exception("too many messages") }}{% endif %}"""

FEATURE_CASES = [
    {
        "name": "system_and_tools",
        "messages": [
            {"role": "system", "content": "  Be  exact.  "},
            {"role": "user", "content": " What's the weather in Zürich? "},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}},
                    }
                ],
            },
            {"role": "skip", "content": "hidden"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "description": "Weather <forecast> & more",
                    "name": "get_weather",
                    "parameters": {"properties": {"city": {"type": "string"}}, "type": "object"},
                },
            }
        ],
        "add_generation_prompt": True,
    },
    {
        "name": "no_system_break",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "stop", "content": ""},
            {"role": "user", "content": "never shown"},
        ],
        "tools": None,
        "add_generation_prompt": False,
    },
]


def generate_model(llama_server, shape, seed, out, tokenizer_dir):
    subprocess.run(
        [llama_server, "generate-model", "--shape", shape, "--seed", str(seed), "--out", str(out),
         "--tokenizer-dir", str(tokenizer_dir)],
        check=True, stdout=subprocess.DEVNULL,
    )


def prompt_ids(tokenizer, prompt):
    if "messages" in prompt:
        rendered = tokenizer.apply_chat_template(
            prompt["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return rendered, ids
    return None, tokenizer(prompt["text"], add_special_tokens=True)["input_ids"]


@torch.no_grad()
def record(model, tokenizer, prompt):
    rendered, ids = prompt_ids(tokenizer, prompt)
    logits = model(torch.tensor([ids])).logits[0].float()
    last = logits[-1]
    top = torch.topk(last, 10)
    greedy, seq = [], list(ids)
    for _ in range(GREEDY_STEPS):
        next_logits = model(torch.tensor([seq])).logits[0, -1]
        token = int(torch.argmax(next_logits))
        greedy.append(token)
        seq.append(token)
    entry = dict(prompt)
    entry.update({
        "rendered": rendered,
        "input_ids": ids,
        "logits_at_ids": [[float(row[i]) for i in LOGIT_IDS] for row in logits],
        "last_top10": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        "greedy": greedy,
    })
    return entry


def sort_keys_deep(value):
    """The feature cases in key order, as the committed goldens were made. The Rust side keeps
    a JSON object's own key order (serde_json with `preserve_order`), like transformers, so
    any order renders alike on both sides; sorting keeps regenerated goldens identical."""
    if isinstance(value, dict):
        return {k: sort_keys_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sort_keys_deep(v) for v in value]
    return value


def feature_renders(tokenizer):
    renders = []
    for case in map(sort_keys_deep, FEATURE_CASES):
        text = tokenizer.apply_chat_template(
            case["messages"], tools=case["tools"], chat_template=FEATURE_TEMPLATE,
            tokenize=False, add_generation_prompt=case["add_generation_prompt"])
        renders.append(dict(case, rendered=text))
    return {"template": FEATURE_TEMPLATE, "cases": renders}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", default=str(ROOT / "target" / "debug" / "llama-server"))
    parser.add_argument("--tokenizer-dir", default=os.environ.get("LLAMA_TOKENIZER_DIR"))
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer_dir or subprocess.run(
        [str(ROOT / "scripts" / "setup-tokenizer.sh")], check=True, capture_output=True,
        text=True).stdout.strip()
    torch.manual_seed(0)
    GOLDENS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, seed in SHAPES:
            out = pathlib.Path(tmp) / shape
            generate_model(args.llama_server, shape, seed, out, tokenizer_dir)
            tokenizer = AutoTokenizer.from_pretrained(out)
            model = LlamaForCausalLM.from_pretrained(
                out, dtype=torch.float32, attn_implementation="eager").eval()
            golden = {
                "shape": shape,
                "seed": seed,
                "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
                "logit_ids": LOGIT_IDS,
                "prompts": [record(model, tokenizer, p) for p in PROMPTS],
            }
            path = GOLDENS / f"{shape}-seed{seed}.json"
            path.write_text(json.dumps(golden, ensure_ascii=False) + "\n")
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
        path = GOLDENS / "chat-template-features.json"
        path.write_text(json.dumps(feature_renders(tokenizer), ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
