"""The unmodified azure-ai-inference SDK against a real llama-server."""

import json
import os
import re
from pathlib import Path

import pytest
from azure.ai.inference import ChatCompletionsClient, EmbeddingsClient, ImageEmbeddingsClient
from azure.ai.inference.models import (
    AssistantMessage,
    ChatCompletionsToolDefinition,
    CompletionsFinishReason,
    FunctionDefinition,
    ImageEmbeddingInput,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)

from conftest import MODEL_NAME


def client(server, key=None, **kwargs) -> ChatCompletionsClient:
    # retry_total=0: azure-core would otherwise retry 429/503 answers on its own.
    return ChatCompletionsClient(
        endpoint=server.endpoint,
        credential=AzureKeyCredential(key or server.primary),
        retry_total=0,
        **kwargs,
    )


def test_get_model_info(server):
    info = client(server).get_model_info()
    assert info.model_name == MODEL_NAME
    assert info.model_type == "chat-completion"
    assert info.model_provider_name == "Meta"


def test_complete_reports_exact_usage_and_finish_reason(server):
    result = client(server).complete(
        messages=[SystemMessage("You are terse."), UserMessage("Say hello.")],
        max_tokens=7, temperature=0, seed=1,
    )
    assert result.model == MODEL_NAME
    assert result.id.startswith("chatcmpl-")
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in (CompletionsFinishReason.TOKEN_LIMIT_REACHED, CompletionsFinishReason.STOPPED)
    assert result.usage.prompt_tokens > 10
    assert 1 <= result.usage.completion_tokens <= 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_adds_up_to_the_plain_answer(server):
    c = client(server)
    kwargs = dict(messages=[UserMessage("Count to five.")], max_tokens=12, temperature=0)
    plain = c.complete(**kwargs)
    updates = list(c.complete(stream=True, **kwargs))
    text = "".join(u.choices[0].delta.content or "" for u in updates if u.choices)
    assert text == plain.choices[0].message.content
    finals = [u for u in updates if u.choices and u.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].usage.completion_tokens == plain.usage.completion_tokens
    assert finals[0].usage.prompt_tokens == plain.usage.prompt_tokens


def test_seed_makes_sampling_reproducible(server):
    c = client(server)
    kwargs = dict(messages=[UserMessage("Tell a story.")], max_tokens=10, temperature=0.9, seed=42)
    assert c.complete(**kwargs).choices[0].message.content == c.complete(**kwargs).choices[0].message.content


def test_secondary_key_works_too(server):
    assert client(server, key=server.secondary).get_model_info().model_name == MODEL_NAME


def test_all_roles_and_tool_turns(server):
    tool = ChatCompletionsToolDefinition(function=FunctionDefinition(
        name="get_weather", description="Weather of a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
    messages = [
        SystemMessage("You can call tools."),
        UserMessage("Weather in Oslo?"),
        AssistantMessage(tool_calls=[{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
        ToolMessage(tool_call_id="call_1", content='{"temperature": 3}'),
    ]
    c = client(server)
    with_tools = c.complete(messages=messages, tools=[tool], max_tokens=4)
    without = c.complete(messages=messages, max_tokens=4)
    # The tool definitions are rendered into the prompt by the model's chat template.
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens


def test_model_extras_are_passed_through(server):
    result = client(server).complete(
        messages=[UserMessage("hi")], max_tokens=3,
        model_extras={"n": 2, "logprobs": 2, "ignore_eos": True},
    )
    assert len(result.choices) == 2
    assert result.usage.completion_tokens == 6  # ignore_eos: both run to max_tokens
    entries = result.choices[0]["logprobs"]["content"]
    assert len(entries) == 3
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)


def test_unknown_model_extra_is_422(server):
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(messages=[UserMessage("hi")], model_extras={"frobnicate": 1})
    assert err.value.status_code == 422
    assert err.value.error.code == "parameter_not_supported"
    assert "frobnicate" in err.value.message


def test_unknown_key_without_header_is_400(server):
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(body={"messages": [{"role": "user", "content": "x"}], "foo": 1})
    assert err.value.status_code == 400
    assert err.value.error.code == "extra_parameters_not_allowed"
    assert "foo" in err.value.message


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(presence_penalty=9), "presence_penalty"),
    (dict(max_tokens=-1), "max_tokens"),
])
def test_out_of_range_values_are_400_naming_the_parameter(server, kwargs, param):
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(messages=[UserMessage("hi")], **kwargs)
    assert err.value.status_code == 400
    assert err.value.error.code == "invalid_request"
    assert param in err.value.message


def test_json_mode_is_422(server):
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(messages=[UserMessage("hi")], response_format="json_object")
    assert err.value.status_code == 422
    assert err.value.error.code == "parameter_not_supported"


def test_image_to_a_text_model_is_422(server):
    from azure.ai.inference.models import ImageContentItem, ImageUrl, TextContentItem
    message = UserMessage(content=[TextContentItem(text="What is this?"),
                                   ImageContentItem(image_url=ImageUrl(url="data:image/png;base64,iVBORw0KGgo="))])
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(messages=[message])
    assert err.value.status_code == 422
    assert "text only" in err.value.message


def test_wrong_key_is_401(server):
    with pytest.raises(ClientAuthenticationError) as err:
        client(server, key="x" * 32).complete(messages=[UserMessage("hi")])
    assert err.value.status_code == 401
    assert err.value.error.code == "unauthorized"


def test_embeddings_are_404(server):
    embeddings = EmbeddingsClient(endpoint=server.endpoint,
                                  credential=AzureKeyCredential(server.primary), retry_total=0)
    with pytest.raises(ResourceNotFoundError) as err:
        embeddings.embed(input=["hello"])
    assert err.value.status_code == 404
    assert err.value.error.code == "not_found"


def test_image_embeddings_are_404(server):
    embeddings = ImageEmbeddingsClient(endpoint=server.endpoint,
                                       credential=AzureKeyCredential(server.primary), retry_total=0)
    with pytest.raises(ResourceNotFoundError) as err:
        embeddings.embed(input=[ImageEmbeddingInput(image="data:image/png;base64,iVBORw0KGgo=")])
    assert err.value.status_code == 404
    assert err.value.error.code == "not_found"


def test_flagged_prompt_is_400_content_filter(server):
    sample = 'llama_server_content_filtered_total{stage="prompt"}'
    before = server.metric(sample)
    with pytest.raises(HttpResponseError) as err:
        client(server).complete(messages=[UserMessage("Tell me about the Forbidden Fruit.")])
    assert err.value.status_code == 400
    assert err.value.error.code == "content_filter"
    assert "content management policy" in err.value.message
    assert err.value.response.json()["error"]["param"] == "prompt"
    assert server.metric(sample) == before + 1


def test_body_too_large_is_413(server_factory):
    small = server_factory({"http": {"maxBodyBytes": 4096}})
    with pytest.raises(HttpResponseError) as err:
        client(small).complete(messages=[UserMessage("x" * 10_000)])
    assert err.value.status_code == 413
    assert err.value.error.code == "payload_too_large"


def test_rate_limit_is_429_with_retry_after(server_factory):
    limited = server_factory({"rateLimits": {"requestsPerMinute": 2}})
    c = client(limited)
    for _ in range(2):
        c.complete(messages=[UserMessage("hi")], max_tokens=1)
    with pytest.raises(HttpResponseError) as err:
        c.complete(messages=[UserMessage("hi")], max_tokens=1)
    assert err.value.status_code == 429
    assert err.value.error.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert err.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.metric('llama_server_rate_limited_total{limit="requests"}') == 1


def test_beam_search_through_model_extras(server):
    c = client(server)
    result = c.complete(messages=[UserMessage("Hi")], max_tokens=4, temperature=0,
                        model_extras={"use_beam_search": True, "best_of": 3, "n": 2, "ignore_eos": True})
    assert len(result.choices) == 2
    assert all(ch.finish_reason == CompletionsFinishReason.TOKEN_LIMIT_REACHED for ch in result.choices)
    assert result.usage.completion_tokens == 8
    with pytest.raises(HttpResponseError) as err:
        c.complete(messages=[UserMessage("Hi")], temperature=0.5,
                   model_extras={"use_beam_search": True, "best_of": 3})
    assert err.value.status_code == 400 and "temperature" in err.value.message


def test_best_of_without_beam_search_keeps_one_of_three_candidates(server):
    result = client(server).complete(
        messages=[UserMessage("Tell a story.")], max_tokens=3, temperature=1.0, seed=3,
        model_extras={"n": 1, "best_of": 3, "ignore_eos": True},
    )
    assert len(result.choices) == 1
    assert result.choices[0].finish_reason == CompletionsFinishReason.TOKEN_LIMIT_REACHED
    # Usage counts every candidate generated, not only the one returned.
    assert result.usage.completion_tokens == 9


def _token_ids_by_bytes() -> dict:
    """The Llama 3 vocabulary as token bytes → id (byte-level BPE keys decoded, GPT-2 style)."""
    data = json.loads((Path(os.environ["LLAMA_TOKENIZER_DIR"]) / "tokenizer.json").read_text())
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            to_byte[chr(256 + extra)] = b
            extra += 1
    ids = {bytes(to_byte[c] for c in key): i for key, i in data["model"]["vocab"].items()}
    ids.update({t["content"].encode(): t["id"] for t in data["added_tokens"]})
    return ids


def test_stop_token_ids_end_the_completion_at_that_token(server):
    c = client(server)
    # Seeded sampling: the same tokens every time, and (unlike greedy decoding with the random
    # model) not one token repeated.
    kwargs = dict(messages=[UserMessage("Count on.")], max_tokens=8, temperature=1.0, seed=5)
    plain = c.complete(**kwargs, model_extras={"ignore_eos": True, "logprobs": 1})
    assert plain.choices[0].finish_reason == CompletionsFinishReason.TOKEN_LIMIT_REACHED
    entries = plain.choices[0]["logprobs"]["content"]
    ids = _token_ids_by_bytes()
    # A token after the first whose id is known and differs from every earlier one's (same
    # bytes ⇔ same id), so generation must stop exactly there.
    k, stop_id = next((k, ids[bytes(e["bytes"])]) for k, e in enumerate(entries)
                      if k >= 1 and bytes(e["bytes"]) in ids
                      and all(p["bytes"] != e["bytes"] for p in entries[:k]))
    stopped = c.complete(**kwargs, model_extras={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == CompletionsFinishReason.STOPPED
    assert stopped.usage.completion_tokens == k + 1  # the stop token is generated, not shown
    assert plain.choices[0].message.content.startswith(stopped.choices[0].message.content)
    assert len(stopped.choices[0].message.content) < len(plain.choices[0].message.content)


def test_skip_special_tokens_false_shows_special_tokens(server):
    c = client(server)
    special = re.compile(r"<\|[a-z_0-9]+\|>")
    # Sampled text from the random model holds a reserved special token now and then: find a
    # seed whose answer has one (the same seed always gives the same tokens).
    for seed in range(8):
        kwargs = dict(messages=[UserMessage("hi")], max_tokens=300, temperature=2.0, seed=seed)
        shown = c.complete(**kwargs, model_extras={"ignore_eos": True, "skip_special_tokens": False})
        if special.search(shown.choices[0].message.content):
            break
    else:
        pytest.fail("no special token in 8 sampled answers")
    skipped = c.complete(**kwargs, model_extras={"ignore_eos": True})
    assert skipped.usage.completion_tokens == shown.usage.completion_tokens
    assert not special.search(skipped.choices[0].message.content)
    assert skipped.choices[0].message.content == special.sub("", shown.choices[0].message.content)
