"""The Anthropic endpoint, driven by the official anthropic SDK, against a fake upstream."""

from __future__ import annotations

import anthropic
import pytest

from tests.upstreams import TOOL_ARGUMENTS

WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


def test_message(proxy, upstream):
    message = proxy.anthropic().messages.create(
        model="claude-test", max_tokens=64, system="Be brief.", extra_body={"temperature": 0.3},
        stop_sequences=["END"], messages=[{"role": "user", "content": "hello there"}])
    assert message.content[0].text == "echo: hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 13 and message.usage.output_tokens == 5
    sent = upstream.last
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 64
    assert sent["stop_sequences"] == ["END"] and sent["temperature"] == 0.3
    assert upstream.headers[-1]["anthropic-version"]


def test_streaming_full_event_sequence(proxy):
    with proxy.anthropic().messages.stream(
            model="claude-test", max_tokens=64,
            messages=[{"role": "user", "content": "one two three"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == "echo: one two three"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    for kind in ("content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta"):
        assert kind in kinds


def test_tool_use_round_trip(proxy, upstream):
    client = proxy.anthropic()
    first = client.messages.create(
        model="claude-test", max_tokens=64, tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "weather?"}])
    block = first.content[0]
    assert first.stop_reason == "tool_use"
    assert block.type == "tool_use" and block.input == TOOL_ARGUMENTS
    second = client.messages.create(
        model="claude-test", max_tokens=64, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [block.model_dump()]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": "18C"}]}])
    assert second.content[0].text == "echo: weather?"
    sent = upstream.last["messages"]
    assert sent[1]["content"][0]["id"] == block.id
    assert sent[2]["content"][0]["tool_use_id"] == block.id


def test_streaming_tool_use(proxy):
    with proxy.anthropic().messages.stream(
            model="claude-test", max_tokens=64, tools=[WEATHER_TOOL],
            messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].name == "get_weather" and final.content[0].input == TOOL_ARGUMENTS


def test_unknown_fields_pass_through(proxy, upstream):
    message = proxy.anthropic().messages.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        metadata={"user_id": "u-1"}, extra_body={"brand_new_param": True, "top_k": 3})
    sent = upstream.last
    assert sent["brand_new_param"] is True and sent["top_k"] == 3
    assert sent["metadata"] == {"user_id": "u-1"}
    assert sent["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert message.model_extra["x_fake_extra"] == "kept"  # response extras too


def test_models_list_in_anthropic_format(proxy):
    ids = [m.id for m in proxy.anthropic().models.list()]
    assert ids == ["gpt-test", "claude-test", "mock-1"]


@pytest.mark.parametrize(("model", "error", "status"), [
    ("no-such-model", anthropic.NotFoundError, 404),
    ("ant/m-status-400", anthropic.BadRequestError, 400),
    ("ant/m-status-403", anthropic.PermissionDeniedError, 403),
    ("ant/m-status-429", anthropic.RateLimitError, 429),
    ("ant/m-status-529", anthropic.APIStatusError, 502),
    ("ant/m-slow", anthropic.APIStatusError, 504),
])
def test_errors_surface_as_sdk_exceptions(proxy, model, error, status):
    with pytest.raises(error) as caught:
        proxy.anthropic().messages.create(
            model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["message"]


def test_stream_cut_mid_way_ends_with_error_event(proxy):
    with pytest.raises(anthropic.APIStatusError, match="before it was complete"), \
            proxy.anthropic().messages.stream(
                model="ant/m-cut", max_tokens=64,
                messages=[{"role": "user", "content": "a b c d e f"}]) as stream:
        for _ in stream:
            pass

