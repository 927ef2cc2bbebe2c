"""The OpenAI endpoint, driven by the official openai SDK, against a fake OpenAI upstream."""

from __future__ import annotations

import json

import openai
import pytest

from tests.upstreams import TOOL_ARGUMENTS

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_completion(proxy, upstream):
    client = proxy.openai()
    result = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hello there"}],
        temperature=0.2, max_tokens=50, stop=["END"])
    assert result.choices[0].message.content == "echo: hello there"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 11 and result.usage.completion_tokens == 7
    sent = upstream.last
    assert sent["model"] == "gpt-test"
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50 and sent["stop"] == ["END"]


def test_streaming_with_usage(proxy, upstream):
    client = proxy.openai()
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "one two three"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    assert upstream.last["stream"] is True


def test_streaming_without_usage_sends_no_usage_chunk(proxy):
    stream = proxy.openai().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_call_round_trip(proxy, upstream):
    client = proxy.openai()
    first = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL], tool_choice="auto")
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
    assert upstream.last["tools"] == [WEATHER_TOOL]
    second = client.chat.completions.create(
        model="gpt-test", tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}])
    assert second.choices[0].message.content == "echo: weather?"
    messages = upstream.last["messages"]
    assert messages[1]["tool_calls"][0]["id"] == call.id
    assert messages[2] == {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}


def test_streaming_tool_call(proxy):
    stream = proxy.openai().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL], stream=True)
    arguments = ""
    names = []
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            if call.function.name:
                names.append(call.function.name)
            arguments += call.function.arguments or ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == TOOL_ARGUMENTS


def test_unknown_fields_pass_through(proxy, upstream):
    result = proxy.openai().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi", "x_msg_flag": 1}],
        extra_body={"vendor_param_added_last_week": {"a": [1, 2]}, "seed": 7},
        max_completion_tokens=33)
    sent = upstream.last
    assert sent["vendor_param_added_last_week"] == {"a": [1, 2]}
    assert sent["seed"] == 7
    assert sent["messages"][0]["x_msg_flag"] == 1
    assert sent["max_completion_tokens"] == 33 and "max_tokens" not in sent
    # ... and the response's unknown fields come back.
    assert result.system_fingerprint == "fp_fake"


def test_image_part_passes_through(proxy, upstream):
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                   "detail": "low"}}]
    proxy.openai().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": content}])
    assert upstream.last["messages"][0]["content"] == content


def test_models_list(proxy):
    ids = [m.id for m in proxy.openai().models.list()]
    assert ids == ["gpt-test", "claude-test", "mock-1"]


def test_provider_slash_model_addresses_provider(proxy, upstream):
    result = proxy.openai().chat.completions.create(
        model="oai/some-new-model", messages=[{"role": "user", "content": "hi"}])
    assert upstream.last["model"] == "some-new-model"
    assert result.model == "some-new-model"


@pytest.mark.parametrize(("model", "error", "status"), [
    ("no-such-model", openai.NotFoundError, 404),
    ("oai/m-status-400", openai.BadRequestError, 400),
    ("oai/m-status-401", openai.AuthenticationError, 401),
    ("oai/m-status-429", openai.RateLimitError, 429),
    ("oai/m-status-500", openai.InternalServerError, 502),
    ("oai/m-status-503", openai.InternalServerError, 502),
    ("oai/m-slow", openai.InternalServerError, 504),
])
def test_errors_surface_as_sdk_exceptions(proxy, model, error, status):
    with pytest.raises(error) as caught:
        proxy.openai().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["message"]
    if status in (400, 401, 429):
        assert f"fake upstream says {status}" in body["message"]


def test_streaming_errors_before_first_byte_keep_status(proxy):
    with pytest.raises(openai.RateLimitError):
        proxy.openai().chat.completions.create(
            model="oai/m-status-429", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_stream_cut_mid_way_ends_with_error_event(proxy):
    stream = proxy.openai().chat.completions.create(
        model="oai/m-cut", messages=[{"role": "user", "content": "a b c d e f"}], stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="before it was complete"):
        for chunk in stream:
            seen.append(chunk)
    assert seen, "the chunks before the cut reached the client"
