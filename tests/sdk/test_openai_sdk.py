"""The unmodified openai SDK against a real llama-server's /v1 routes."""

import openai
import pytest

from conftest import MODEL_NAME


def client(server, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.endpoint}/v1", api_key=key or server.primary, max_retries=0)


def test_models_list(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].owned_by == "Meta"


def test_create_with_usage(server):
    result = client(server).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.usage.completion_tokens <= 5


def test_max_completion_tokens_and_developer_role(server):
    result = client(server).chat.completions.create(
        model=MODEL_NAME, max_completion_tokens=2, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert result.usage.completion_tokens == 2
    assert result.choices[0].finish_reason == "length"


def test_streaming_with_include_usage(server):
    c = client(server)
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    plain = c.chat.completions.create(**kwargs)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 1


def test_logprobs_and_n(server):
    result = client(server).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}, seed=5)
    assert len(result.choices) == 2
    for choice in result.choices:
        assert len(choice.logprobs.content) == 3
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
            assert entry.logprob <= 0.0


def test_stop_strings_are_never_emitted(server):
    c = client(server)
    base = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=24,
                temperature=0.8, seed=11, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**base).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = c.chat.completions.create(stop=[stop], **base).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.message.content
    assert full.startswith(cut.message.content)


def test_errors_map_to_the_sdks_exception_types(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.AuthenticationError):
        client(server, key="y" * 32).chat.completions.create(model=MODEL_NAME, messages=msgs)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=5)
    assert err.value.body["param"] == "temperature" if isinstance(err.value.body, dict) and "param" in err.value.body else "temperature" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model=MODEL_NAME, messages=msgs, response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model=MODEL_NAME, input="hello")


def test_rate_limit_error(server_factory):
    limited = server_factory({"rateLimits": {"requestsPerMinute": 1}})
    c = client(limited)
    c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_the_next_turn_reuses_the_conversation_and_answers_as_without_the_cache(server_factory):
    cached = server_factory({})
    plain = server_factory({"engine": {"prefixCache": False}})
    first = [{"role": "system", "content": "You answer in one sentence."},
             {"role": "user", "content": "What is a key/value cache?"}]
    kwargs = dict(model=MODEL_NAME, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    one = client(cached).chat.completions.create(messages=first, **kwargs)
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "And a prefix cache?"}]
    two = client(cached).chat.completions.create(messages=second, **kwargs)
    # The whole first prompt (and as much of the answer as re-encodes to the same tokens) is
    # reused; the new turn is computed.
    reused = two.usage.prompt_tokens_details.cached_tokens
    assert one.usage.prompt_tokens <= reused < two.usage.prompt_tokens
    without = client(plain).chat.completions.create(messages=second, **kwargs)
    assert without.usage.prompt_tokens_details.cached_tokens == 0
    assert two.choices[0].message.content == without.choices[0].message.content
    assert two.usage.prompt_tokens == without.usage.prompt_tokens
    # Streamed, the final usage chunk says the same; the metrics count the hits.
    chunks = list(client(cached).chat.completions.create(
        messages=second, stream=True, stream_options={"include_usage": True}, **kwargs))
    # The same prompt again: all but its last two tokens (a step of two takes the prompt kernels).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == two.usage.prompt_tokens - 2
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) \
        == two.choices[0].message.content
    hits = cached.metric("llama_server_prefix_cache_hit_tokens_total")
    assert hits == reused + two.usage.prompt_tokens - 2
    assert plain.metric("llama_server_prefix_cache_hit_tokens_total") == 0
