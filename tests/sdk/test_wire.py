"""The wire contract checked byte by byte with a plain HTTP client, where the SDKs hide it."""

import json
import re
import signal
import threading
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def post(server, path="/chat/completions", body=None, headers=None, **kwargs):
    headers = {"api-key": server.primary, **(headers or {})}
    return httpx.post(f"{server.endpoint}{path}", json=body if body is not None else CHAT,
                      headers=headers, timeout=60, **kwargs)


def test_every_prefix_serves_chat_and_info_with_any_api_version(server):
    for prefix in ["", "/models", "/v1"]:
        r = post(server, f"{prefix}/chat/completions?api-version=2024-05-01-preview")
        assert r.status_code == 200, r.text
        info = httpx.get(f"{server.endpoint}{prefix}/info", headers={"api-key": server.primary})
        assert info.json()["model_type"] == "chat-completion"


def test_three_ways_to_send_a_key(server):
    for headers in ({"api-key": server.primary},
                    {"Authorization": f"Bearer {server.secondary}"},
                    {"Authorization": server.primary}):
        r = httpx.post(f"{server.endpoint}/chat/completions", json=CHAT, headers=headers, timeout=60)
        assert r.status_code == 200, (headers.keys(), r.text)
    r = httpx.post(f"{server.endpoint}/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert "retry-after" not in r.headers


def test_sse_is_data_only_lines(server):
    body = {**CHAT, "stream": True, "max_tokens": 6}
    with httpx.stream("POST", f"{server.endpoint}/chat/completions", json=body,
                      headers={"api-key": server.primary, "Accept": "application/json"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert b"\r" not in raw
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    for e in events[:-1]:
        assert re.fullmatch(r"data: [^\n]+", e), e
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["usage"]["completion_tokens"] >= 1


def test_malformed_json_names_line_and_column(server):
    r = httpx.post(f"{server.endpoint}/chat/completions", content=b'{"messages": [\n  {"role": "user",, }]}',
                   headers={"api-key": server.primary, "content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert "line 2" in error["message"] and "column" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "nope"}]}, "tools[0]"),
])
def test_invalid_bodies_name_the_field(server, body, param):
    r = post(server, body=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["detail"][0]["loc"][0] == "body"


def test_extra_parameters_header_values(server):
    body = {**CHAT, "n": 2}
    assert post(server, body=body).status_code == 400
    assert len(post(server, body=body, headers={"extra-parameters": "drop"}).json()["choices"]) == 1
    assert len(post(server, body=body, headers={"extra-parameters": "pass-through"}).json()["choices"]) == 2
    r = post(server, body=body, headers={"extra-parameters": "maybe"})
    assert r.status_code == 400 and "pass-through" in r.json()["error"]["message"]


def test_openai_routes_drop_unknown_keys(server):
    r = post(server, "/v1/chat/completions", body={**CHAT, "logit_bias": {}, "user": "u"})
    assert r.status_code == 200


def test_stream_true_string_is_coerced(server):
    r = post(server, body={**CHAT, "stream": "True"})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_prompt_longer_than_the_context_is_400(server_factory):
    small = server_factory({"contextLength": 64})
    r = post(small, body={"messages": [{"role": "user", "content": "word " * 200}]})
    assert r.status_code == 400
    assert "tokens" in r.json()["error"]["message"]


def test_unknown_route_is_404_with_an_azure_body(server):
    r = httpx.get(f"{server.endpoint}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/images/embeddings", "/models/images/embeddings",
                                  "/v1/images/embeddings", "/models/embeddings", "/v1/embeddings"])
def test_embeddings_under_every_prefix_are_404_with_an_azure_body(server, path):
    label = f'llama_server_requests_total{{route="{path}",status="404"}}'
    before = server.metric(label)
    r = post(server, path, body={"input": [{"image": "data:image/png;base64,iVBORw0KGgo="}]})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "not_found" and error["status"] == 404
    assert "embeddings" in error["message"]
    assert "retry-after" not in r.headers
    # Counted under its own route, not "other".
    assert server.metric(label) == before + 1


def test_only_429_and_503_carry_retry_after(server_factory):
    s = server_factory({"http": {"maxBodyBytes": 4096}})
    headers = {"api-key": s.primary, "content-type": "application/json"}
    answers = {
        400: httpx.post(f"{s.endpoint}/chat/completions", content=b"{", headers=headers),
        413: httpx.post(f"{s.endpoint}/chat/completions", content=b"x" * 10_000, headers=headers),
        422: post(s, body={**CHAT, "response_format": {"type": "json_object"}}),
    }
    for status, r in answers.items():
        assert r.status_code == status, r.text
        assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers, status


def test_tokens_per_minute_answer_429_with_headers(server_factory):
    s = server_factory({"rateLimits": {"tokensPerMinute": 200}})
    long = {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 1}
    # The first prompt, larger than the whole budget, is admitted because the bucket is full;
    # it leaves the bucket empty.
    first = post(s, body=long)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["prompt_tokens"] > 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    r = post(s, body=long)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in error["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(r.headers["x-ratelimit-remaining-requests"]) >= 1
    assert s.metric('llama_server_rate_limited_total{limit="tokens"}') == 1
    assert s.metric('llama_server_rate_limited_total{limit="requests"}') == 0


def test_keys_are_reread_when_the_secret_changes(server_factory):
    s = server_factory()
    old = s.primary
    new = "n" * 32
    (s.keys_dir / "primaryKey").write_text(new)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and post(s, headers={"api-key": new}).status_code != 200:
        time.sleep(0.3)
    assert post(s, headers={"api-key": new}).status_code == 200
    assert post(s, headers={"api-key": old}).status_code == 401
    assert old not in s.log_text() and new not in s.log_text()


def test_metrics_cover_requests_tokens_latency_queue_and_rejections(server):
    post(server)
    post(server, headers={"api-key": "z" * 32})
    text = httpx.get(f"{server.endpoint}/metrics").text
    for name in ["llama_server_requests_total", "llama_server_prompt_tokens_total",
                 "llama_server_completion_tokens_total", "llama_server_time_to_first_token_seconds_bucket",
                 "llama_server_time_per_output_token_seconds_bucket", "llama_server_queue_depth",
                 "llama_server_running_sequences", "llama_server_kv_cache_used_tokens",
                 "llama_server_kv_cache_budget_tokens", "llama_server_requests_in_flight"]:
        assert name in text, name
    assert re.search(r'llama_server_requests_total\{route="/chat/completions",status="401"\} [1-9]', text)


def test_full_queue_answers_429_and_disconnects_free_the_batch(server_factory):
    s = server_factory({"engine": {"maxBatchSize": 1, "maxQueue": 1}})
    long = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4000,
            "stream": True, "ignore_eos": True}
    holders = []

    def hold():
        # The queued request receives nothing after its first chunk: a short read timeout
        # makes its client hang up too.
        try:
            with httpx.stream("POST", f"{s.endpoint}/chat/completions", json=long,
                              timeout=httpx.Timeout(60, read=3),
                              headers={"api-key": s.primary, "extra-parameters": "pass-through"}) as r:
                holders.append(r.status_code)
                for _ in r.iter_raw():
                    if len(holders) > 2:
                        break
        except httpx.ReadTimeout:
            pass

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    r = post(s)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert s.metric('llama_server_rate_limited_total{limit="queue"}') >= 1
    holders.extend([0, 0])  # tell the streaming clients to hang up
    for t in threads:
        t.join(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{s.endpoint}/metrics").text
        if re.search(r"^llama_server_running_sequences 0$", text, re.M) and \
                re.search(r"^llama_server_queue_depth 0$", text, re.M):
            break
        time.sleep(0.2)
    else:
        pytest.fail("cancelled sequences still hold the batch:\n" + text)
    assert post(s).status_code == 200


def test_sigterm_drains_streams_then_exits_zero(server_factory):
    s = server_factory(drain_seconds=30)
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    received = []
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{s.endpoint}/chat/completions", json=body,
                         headers={"api-key": s.primary, "extra-parameters": "pass-through"}) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 2:
                    s.process.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    # Not ready any more: refused (no longer accepting) or 503.
                    try:
                        assert httpx.get(f"{s.endpoint}/health/ready", timeout=5).status_code == 503
                    except httpx.ConnectError:
                        pass
                received.append(line)
    assert received[-2:] == ["data: [DONE]", ""] or received[-1] == "data: [DONE]"
    assert s.process.wait(timeout=30) == 0
    assert "drained" in s.log_text()


def test_token_mode_validates_issuer_audience_expiry_and_signature(server_factory, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "use": "sig", "alg": "RS256"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    issuer = "https://login.microsoftonline.com/tenant/v2.0"
    s = server_factory({"auth": {"mode": "token", "token": {
        "issuer": issuer, "audience": "api://llama", "jwksFile": str(jwks)}}})

    def token(signer=key, **claims):
        body = {"iss": issuer, "aud": "api://llama", "exp": int(time.time()) + 600, **claims}
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": "k1"})

    def call(t):
        return httpx.post(f"{s.endpoint}/chat/completions", json=CHAT,
                          headers={"Authorization": f"Bearer {t}"}, timeout=60)

    assert call(token()).status_code == 200
    for bad, why in [(token(iss="https://evil"), "issuer"), (token(aud="api://other"), "audience"),
                     (token(exp=int(time.time()) - 3600), "expired"), (token(signer=other), "signature")]:
        r = call(bad)
        assert r.status_code == 401, why
        assert why in r.json()["error"]["message"], (why, r.text)
    assert call("not-a-jwt").status_code == 401


def test_flagged_completion_ends_with_content_filter(server_factory):
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 30,
            "temperature": 1.0, "seed": 7, "ignore_eos": True}
    headers = {"extra-parameters": "pass-through"}
    plain_server = server_factory({"contentSafety": {"enabled": True}})
    text = post(plain_server, body=body, headers=headers).json()["choices"][0]["message"]["content"]
    words = [w for w in re.findall(r"[A-Za-z]{4,}", text)]
    assert words, f"no word to block in {text!r}"
    word = words[len(words) // 2]
    assert word.lower() not in "say something"
    strict = server_factory({"contentSafety": {"enabled": True, "blocklist": [word]}})
    # With logprobs asked for: their entries name tokens, so they must not show the word either.
    body = {**body, "logprobs": 1}
    choice = post(strict, body=body, headers=headers).json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert word.lower() not in choice["message"]["content"].lower()
    tokens = "".join(e["token"] for e in choice["logprobs"]["content"])
    assert word.lower() not in tokens.lower()
    # Streamed, the flagged word is never sent either.
    with httpx.stream("POST", f"{strict.endpoint}/chat/completions", json={**body, "stream": True},
                      headers={"api-key": strict.primary, **headers}, timeout=60) as r:
        raw = b"".join(r.iter_raw()).decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert word.lower() not in streamed.lower()
    streamed_tokens = "".join(e["token"] for c in chunks if c["choices"]
                              for e in (c["choices"][0].get("logprobs") or {}).get("content", []))
    assert streamed_tokens and word.lower() not in streamed_tokens.lower()
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "content_filter" for c in chunks)
    assert strict.metric('llama_server_content_filtered_total{stage="completion"}') == 2
    assert strict.metric('llama_server_content_filtered_total{stage="prompt"}') == 0
