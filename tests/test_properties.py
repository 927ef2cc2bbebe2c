"""Property-based tests (hypothesis): the wire formats round-trip what they model, and
random or mutated requests get a 2xx or a 4xx from a live server, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.canonical import Message, Request, TextPart, Tool, ToolChoice
from proxy.formats import anthropic, openai
from tests.harness import ProxyServer, post_raw

text = st.text(min_size=1, max_size=40)
names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,15}", fullmatch=True)
json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    count = draw(st.integers(1, 5))
    messages = [Message(role="user" if i % 2 == 0 else "assistant",
                        content=[TextPart(text=draw(text))]) for i in range(count)]
    tools = draw(st.lists(st.builds(
        Tool, name=names, description=text,
        parameters=st.just({"type": "object", "properties": {"x": {"type": "string"}}})),
        max_size=2, unique_by=lambda t: t.name))
    choice = draw(st.none() | st.sampled_from(["auto", "none", "required"]).map(
        lambda mode: ToolChoice(mode=mode))) if tools else None
    return Request(
        model=draw(names),
        messages=messages,
        system=[TextPart(text=draw(text))] if draw(st.booleans()) else [],
        tools=tools,
        tool_choice=choice,
        max_tokens=draw(st.integers(1, 10_000)),
        temperature=draw(st.none() | st.floats(0, 1).map(lambda x: round(x, 3))),
        top_p=draw(st.none() | st.floats(0, 1).map(lambda x: round(x, 3))),
        stop=draw(st.lists(text, max_size=3)),
        stream=draw(st.booleans()),
    )


@pytest.mark.parametrize("wire", [openai, anthropic], ids=["openai", "anthropic"])
@settings(max_examples=200, deadline=None)
@given(request=requests())
def test_each_format_round_trips_what_it_models(wire: Any, request: Request):
    body = wire.encode_request(request, request.model, same_format=True)
    again = wire.decode_request(body)
    again.stream_usage = request.stream_usage = False
    again.extra.pop("stream_options", None)  # what the proxy asks of a provider
    assert again == request


@settings(max_examples=100, deadline=None)
@given(requests())
def test_a_request_crosses_formats_and_back(request: Request):
    via = anthropic.decode_request(anthropic.encode_request(request, request.model,
                                                            same_format=False))
    back = openai.decode_request(openai.encode_request(via, via.model, same_format=False))
    assert [m.text for m in back.messages] == [m.text for m in request.messages]
    assert back.system_text == request.system_text
    assert [t.name for t in back.tools] == [t.name for t in request.tools]
    assert back.max_tokens == request.max_tokens and back.stop == request.stop


# --- a live server under random input ----------------------------------------------------


@pytest.fixture(scope="module")
def mock_proxy() -> Iterator[ProxyServer]:
    config = {"providers": {"mock": {"type": "mock"}},
              "models": [{"name": "mock-1", "provider": "mock"}], "log": {"path": ""}}
    with ProxyServer(config) as proxy:
        yield proxy


VALID = {
    "/v1/chat/completions": {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages": {"model": "mock-1", "max_tokens": 20,
                     "messages": [{"role": "user", "content": "hi"}]},
}


def _post(proxy: ProxyServer, endpoint: str, body: bytes) -> int:
    try:
        status, _, _ = post_raw(proxy.url + endpoint, body)
    except json.JSONDecodeError:
        return 200  # a stream: text/event-stream, not JSON, and so not an error
    return status


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(sorted(VALID)), value=json_values)
def test_random_json_is_never_a_500(mock_proxy: ProxyServer, endpoint: str, value: Any):
    status = _post(mock_proxy, endpoint, json.dumps(value).encode())
    assert 200 <= status < 500, (endpoint, value)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(sorted(VALID)), path=st.lists(
    st.sampled_from(["model", "messages", "max_tokens", "stream", "tools", "tool_choice",
                     "temperature", "stop", "system", 0, "role", "content", "type", "text",
                     "stream_options", "response_format", "hookproxy"]), min_size=1, max_size=3),
    value=json_values)
def test_mutated_requests_are_never_a_500(mock_proxy: ProxyServer, endpoint: str,
                                          path: list[Any], value: Any):
    body = json.loads(json.dumps(VALID[endpoint]))
    target = body
    for key in path[:-1]:
        if isinstance(target, dict) and isinstance(key, str):
            target = target.setdefault(key, {})
        elif isinstance(target, list) and isinstance(key, int) and target:
            target = target[0]
        else:
            break
    last = path[-1]
    if isinstance(target, dict) and isinstance(last, str):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and target:
        target[0] = value
    status = _post(mock_proxy, endpoint, json.dumps(body).encode())
    assert 200 <= status < 500, (endpoint, body)


def test_garbage_bytes_and_the_server_keeps_serving(mock_proxy: ProxyServer):
    for body in (b"", b"\xff\xfe\x00", b"{" * 10_000, b'{"model": "mock-1", "messages": ' +
                 b"[" * 5000, b"null", b'"string"', b"[]", b"1e999"):
        for endpoint in VALID:
            assert 400 <= _post(mock_proxy, endpoint, body) < 500, (endpoint, body[:20])
    assert mock_proxy.openai().chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "still fine"}]).choices
