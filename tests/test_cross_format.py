"""Either client format served by either provider format, tools and streaming included."""

from __future__ import annotations

import json

import openai
import pytest

from tests.test_anthropic_api import WEATHER_TOOL as ANTHROPIC_TOOL
from tests.test_openai_api import WEATHER_TOOL as OPENAI_TOOL
from tests.upstreams import TOOL_ARGUMENTS


def test_openai_client_anthropic_provider(proxy, upstream):
    result = proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hello"}],
        max_tokens=20, stop="END")
    assert result.choices[0].message.content == "echo: hello"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 13 and result.usage.completion_tokens == 5
    sent = upstream.last
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 20
    assert sent["stop_sequences"] == ["END"]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


def test_a_field_with_no_counterpart_is_refused_naming_it(proxy, upstream):
    # Unknown fields go to their own format; to the other one, a 400 names the field and
    # the provider instead of dropping it.
    before = len(upstream.received)
    with pytest.raises(openai.BadRequestError) as info:
        proxy.openai().chat.completions.create(
            model="claude-test", messages=[{"role": "user", "content": "hello"}],
            extra_body={"openai_only_param": 1})
    message = info.value.body["message"]
    assert "`openai_only_param`" in message and "provider ant" in message
    assert info.value.body["code"] == "untranslatable"
    assert len(upstream.received) == before
    # Defaults with no counterpart are no loss: they go.
    proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "hello"}], n=1,
        presence_penalty=0, store=False)
    assert "n" not in upstream.last and "store" not in upstream.last


def test_tool_call_arguments_nested_too_deep_for_another_format_are_a_400(proxy, upstream):
    # Anthropic's tool_use input is an object: arguments nested past what the decoder
    # reads are not one, and the client hears so (not an internal error).
    before = len(upstream.received)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "[" * 1200 + "]" * 1200}}
    with pytest.raises(openai.BadRequestError) as info:
        proxy.openai().chat.completions.create(model="claude-test", messages=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"}])
    assert "not a JSON object" in info.value.body["message"]
    assert len(upstream.received) == before


def test_openai_client_anthropic_provider_default_max_tokens(proxy, upstream):
    proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "hi"}])
    assert upstream.last["max_tokens"] == 4096


def test_openai_client_anthropic_provider_tools(proxy, upstream):
    client = proxy.openai()
    first = client.chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "weather?"}],
        tools=[OPENAI_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert upstream.last["tools"] == [ANTHROPIC_TOOL]
    assert upstream.last["tool_choice"] == {"type": "tool", "name": "get_weather"}
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
    second = client.chat.completions.create(
        model="claude-test", tools=[OPENAI_TOOL], messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18C"}])
    assert second.choices[0].message.content == "echo: weather?"
    sent = upstream.last["messages"]
    assert sent[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": TOOL_ARGUMENTS}]}
    assert sent[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id,
         "content": [{"type": "text", "text": "18C"}]}]}


def test_openai_client_anthropic_provider_streaming(proxy):
    stream = proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "a b c"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: a b c"
    assert chunks[-1].usage.prompt_tokens == 13 and chunks[-1].usage.completion_tokens == 5


def test_openai_client_anthropic_provider_streaming_tools(proxy):
    stream = proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "weather?"}],
        tools=[OPENAI_TOOL], stream=True)
    arguments, finish = "", None
    for chunk in stream:
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or ():
            arguments += call.function.arguments or ""
        finish = choice.finish_reason or finish
    assert json.loads(arguments) == TOOL_ARGUMENTS and finish == "tool_calls"


def test_anthropic_client_openai_provider(proxy, upstream):
    message = proxy.anthropic().messages.create(
        model="gpt-test", max_tokens=30, system="Be brief.",
        messages=[{"role": "user", "content": "hello"}], metadata={"user_id": "u-9"})
    assert message.content[0].text == "echo: hello"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 7
    sent = upstream.last
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"}]
    assert sent["max_tokens"] == 30 and sent["user"] == "u-9"


def test_anthropic_client_openai_provider_tools(proxy, upstream):
    client = proxy.anthropic()
    first = client.messages.create(
        model="gpt-test", max_tokens=30, tools=[ANTHROPIC_TOOL], tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "weather?"}])
    assert upstream.last["tools"] == [OPENAI_TOOL]
    assert upstream.last["tool_choice"] == "required"
    block = first.content[0]
    assert first.stop_reason == "tool_use" and block.input == TOOL_ARGUMENTS
    second = client.messages.create(
        model="gpt-test", max_tokens=30, tools=[ANTHROPIC_TOOL], messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": "18C"}]}])
    assert second.content[0].text == "echo: weather?"
    sent = upstream.last["messages"]
    assert sent[1]["tool_calls"][0]["id"] == block.id
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == TOOL_ARGUMENTS
    assert sent[2] == {"role": "tool", "tool_call_id": block.id, "content": "18C"}


def test_anthropic_client_openai_provider_streaming(proxy, upstream):
    with proxy.anthropic().messages.stream(
            model="gpt-test", max_tokens=30,
            messages=[{"role": "user", "content": "a b c"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: a b c"
    assert final.usage.input_tokens == 11 and final.usage.output_tokens == 7
    assert upstream.last["stream_options"] == {"include_usage": True}


def test_anthropic_client_openai_provider_streaming_tools(proxy):
    with proxy.anthropic().messages.stream(
            model="gpt-test", max_tokens=30, tools=[ANTHROPIC_TOOL],
            messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == TOOL_ARGUMENTS


def test_json_mode_reaches_an_anthropic_provider_as_an_instruction(proxy, upstream):
    proxy.openai().chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "give json"}],
        response_format={"type": "json_object"})
    assert "JSON" in upstream.last["system"]
