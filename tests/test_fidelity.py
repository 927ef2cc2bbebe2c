"""Wire fidelity: through hookproxy with no plugins, same-format requests and answers
arrive JSON-equal on the other side and streams byte for byte; with a plugin that changes
one field, only that field differs. Across formats, each shape translates or is refused
with a 400 naming it and the provider. The shapes are in tests/corpus.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy import RequestContext, Response, TextDelta, TextPart, hookimpl
from proxy.canonical import unchanged
from proxy.formats import anthropic, openai
from proxy.formats.common import decode_json
from proxy.memo import memo
from proxy.plugins import PluginHost
from proxy.record import build_record
from tests import corpus
from tests.harness import ProxyServer, ServedApp, wait_for


class CorpusUpstream(ServedApp):
    """Answers each API with the corpus answer set in ``answer`` (a JSON body, or a list
    of SSE events for a streaming request) and keeps the bodies it received."""

    def __init__(self) -> None:
        super().__init__({"/v1/messages": self._answer, "/v1/chat/completions": self._answer})
        self.received: list[dict[str, Any]] = []
        self.answer: dict[str, Any] = {}

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        fmt = "anthropic" if request.path == "/v1/messages" else "openai"
        if not body.get("stream"):
            return web.json_response(self.answer.get(fmt) or (
                corpus.ANTHROPIC_RESPONSE if fmt == "anthropic" else corpus.OPENAI_RESPONSE))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in (corpus.ANTHROPIC_STREAM if fmt == "anthropic" else corpus.OPENAI_STREAM):
            await response.write(event)
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def upstream() -> Iterator[CorpusUpstream]:
    with CorpusUpstream() as server:
        yield server


class ChangeOneField:
    """Changes what ``scratch`` names: the temperature, the last message's text, the
    answer's text or the streamed text."""

    def __init__(self, what: str) -> None:
        self.what = what

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        if self.what == "temperature":
            ctx.request.temperature = 0.5
        elif self.what == "last_text":
            last = ctx.request.messages[-1]
            text = next(p for p in last.content if isinstance(p, TextPart))
            text.text = "CHANGED"

    @hookimpl
    def post_response(self, response: Response) -> None:
        if self.what == "answer_text":
            next(p for p in response.content if isinstance(p, TextPart)).text = "CHANGED"

    @hookimpl
    def stream_chunk(self, event: Any) -> Any:
        if self.what == "stream_text" and isinstance(event, TextDelta) and event.text:
            event.text = event.text.upper()
        return None


def serving(upstream: CorpusUpstream, change: str | None = None,
            on_finish: Any = None) -> ProxyServer:
    host = PluginHost()
    host.discover()
    plugins: dict[str, Any] = {}
    if change:
        host.add(ChangeOneField(change), "change", "plugin")
        plugins["change"] = {}
    config = {
        "providers": {
            "ant": {"type": "anthropic", "base_url": upstream.url},
            "oai": {"type": "openai", "base_url": f"{upstream.url}/v1"},
        },
        "models": [
            {"name": "claude-fidelity", "provider": "ant"},
            {"name": "gpt-fidelity", "provider": "oai"},
            # The other format's provider, for the cross-format tests.
            {"name": "claude-via-openai", "provider": "oai", "model": "gpt-fidelity"},
            {"name": "gpt-via-anthropic", "provider": "ant", "model": "claude-fidelity",
             "input_price": 1.0, "output_price": 2.0, "cache_read_price": 0.1,
             "cache_write_price": 1.25},
        ],
        "plugins": plugins,
        "log": {"path": ""},
        "routing": {"retries": 0},
    }
    return ProxyServer(config, host=host, on_finish=on_finish)


PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
HEADERS = {"anthropic": {"anthropic-version": "2023-06-01", "x-api-key": "k"},
           "openai": {"authorization": "Bearer k"}}


def corpus_request(fmt: str, stream: bool, model: str | None = None) -> dict[str, Any]:
    body = copy.deepcopy(corpus.ANTHROPIC_REQUEST if fmt == "anthropic"
                         else corpus.OPENAI_REQUEST)
    if stream:
        body["stream"] = True
        if fmt == "openai":
            body["stream_options"] = {"include_usage": True, "include_obfuscation": True}
    if model:
        body["model"] = model
    return body


def send(proxy: ProxyServer, fmt: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(proxy.url + PATHS[fmt], json=body, headers=HEADERS[fmt], timeout=30)


def differences(a: Any, b: Any, path: str = "$") -> list[str]:
    """Where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key, "<missing>"), b.get(key, "<missing>"),
                               f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def sse_events(data: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in data.split(b"\n\n") if event]


# --- same format, no plugins: nothing lost, nothing changed --------------------------------


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_same_format_request_arrives_json_equal(upstream, fmt, stream):
    body = corpus_request(fmt, stream)
    with serving(upstream) as proxy:
        answer = send(proxy, fmt, body)
    assert answer.status_code == 200, answer.text
    received = upstream.received[-1]
    if fmt == "openai" and not stream:
        assert received == body
    else:
        assert differences(body, received) == []


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_same_format_answer_arrives_json_equal(upstream, fmt):
    with serving(upstream) as proxy:
        answer = send(proxy, fmt, corpus_request(fmt, False))
    expected = corpus.ANTHROPIC_RESPONSE if fmt == "anthropic" else corpus.OPENAI_RESPONSE
    assert answer.json() == expected


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_same_format_stream_arrives_byte_for_byte(upstream, fmt):
    with serving(upstream) as proxy:
        answer = send(proxy, fmt, corpus_request(fmt, True))
    events = corpus.ANTHROPIC_STREAM if fmt == "anthropic" else corpus.OPENAI_STREAM
    assert sse_events(answer.content) == events


def test_the_record_keeps_cache_usage_and_prices_it(upstream):
    finished: list[RequestContext] = []
    with serving(upstream, on_finish=finished.append) as proxy:
        send(proxy, "openai", {"model": "gpt-via-anthropic",
                               "messages": [{"role": "user", "content": "hi"}]})
        ctx = wait_for(lambda: finished and finished[0])
    record = build_record(ctx)
    # 50 uncached + 1000 written + 2000 read = 3050 input tokens in all.
    assert (record.input_tokens, record.cache_write_tokens, record.cache_read_tokens) == (
        3050, 1000, 2000)
    assert record.cost == pytest.approx((50 * 1.0 + 70 * 2.0 + 2000 * 0.1 + 1000 * 1.25) / 1e6)


# --- a plugin changes one field: only that field differs ---------------------------------


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("change", ["temperature", "last_text"])
def test_a_changed_field_is_the_only_difference(upstream, fmt, stream, change):
    body = corpus_request(fmt, stream)
    with serving(upstream, change) as proxy:
        assert send(proxy, fmt, body).status_code == 200
    received = upstream.received[-1]
    if change == "temperature":
        expected = ["$.temperature"]
    elif fmt == "anthropic":
        expected = ["$.messages[4].content[1].text"]
    else:
        expected = ["$.messages[7].content"]
    assert differences(body, received) == expected


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_a_change_to_a_remembered_message_stays_in_its_request(upstream, fmt):
    """A message seen before is copied from the memo, not decoded again: a plugin that
    changes it in one request changes neither the memo nor another request's copy."""
    body = corpus_request(fmt, False)
    where = (["$.messages[4].content[1].text"] if fmt == "anthropic"
             else ["$.messages[7].content"])
    hits = memo.hits
    # "answer_text" reads the request (so it is decoded) and changes only answers.
    with serving(upstream, "answer_text") as reading, serving(upstream, "last_text") as changing:
        for proxy, expected in ((reading, []), (changing, where), (reading, []),
                                (changing, where), (reading, [])):
            assert send(proxy, fmt, body).status_code == 200
            assert differences(body, upstream.received[-1]) == expected
    assert memo.hits > hits


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_messages_from_the_memo_equal_a_full_decode(fmt, stream):
    wire = anthropic if fmt == "anthropic" else openai
    body = json.dumps(corpus_request(fmt, stream)).encode()
    full = wire._request(decode_json(body))
    fresh, remembered = wire.decode_request(body), wire.decode_request(body)
    assert fresh == full and remembered == full
    assert fresh.messages is not remembered.messages
    for message in fresh.messages:
        assert unchanged(message)
    encoded = json.loads(wire.encode_request(remembered, remembered.model, same_format=True))
    if fmt == "openai" and stream:  # the proxy always asks for usage when it streams
        encoded["stream_options"]["include_usage"] = True
    assert differences(json.loads(body), encoded) == []


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_a_changed_answer_differs_only_there(upstream, fmt):
    with serving(upstream, "answer_text") as proxy:
        answer = send(proxy, fmt, corpus_request(fmt, False)).json()
    if fmt == "anthropic":
        expected, where = corpus.ANTHROPIC_RESPONSE, ["$.content[4].text"]
    else:
        expected, where = corpus.OPENAI_RESPONSE, ["$.choices[0].message.content"]
        answer["created"] = expected["created"]
    assert differences(expected, answer) == where


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
def test_a_changed_stream_event_is_the_only_difference(upstream, fmt):
    with serving(upstream, "stream_text") as proxy:
        answer = send(proxy, fmt, corpus_request(fmt, True))
    sent = corpus.ANTHROPIC_STREAM if fmt == "anthropic" else corpus.OPENAI_STREAM
    got = sse_events(answer.content)
    assert len(got) == len(sent)
    changed = [i for i, (a, b) in enumerate(zip(sent, got, strict=True)) if a != b]
    texts = [i for i, event in enumerate(sent)
             if b'"text_delta"' in event or b'"content":"One"' in event
             or b'"content":"Two"' in event]
    assert changed == texts
    for i in changed:
        assert got[i].replace(b"BONJOUR", b"Bonjour").replace(b" LE MONDE", b" le monde") \
            .replace(b"ONE", b"One").replace(b"TWO", b"Two") != got[i]


# --- across formats: translated, or a 400 naming what has no counterpart ----------------


def anthropic_body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "claude-via-openai", "max_tokens": 1000, "messages": messages, **fields}


def openai_body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-via-anthropic", "messages": messages, **fields}


PDF_WITHOUT_CONTEXT = {k: v for k, v in corpus.ANTHROPIC_REQUEST["messages"][0]["content"][1]
                       .items() if k != "context"}


def test_anthropic_shapes_translate_to_openai(upstream):
    request = corpus.ANTHROPIC_REQUEST
    messages = request["messages"]
    body = anthropic_body(
        [{"role": "user", "content": [messages[0]["content"][0], PDF_WITHOUT_CONTEXT,
                                      messages[0]["content"][2]]},
         {"role": "assistant", "content": [messages[1]["content"][0],
                                           messages[1]["content"][5]]},
         messages[2], messages[3], {"role": "user", "content": "And tomorrow?"}],
        system=request["system"], thinking=request["thinking"],
        context_management=request["context_management"], metadata=request["metadata"],
        tools=[request["tools"][0]], tool_choice=request["tool_choice"])
    with serving(upstream) as proxy:
        answer = send(proxy, "anthropic", body)
    assert answer.status_code == 200, answer.text
    sent = upstream.received[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "You are a careful agent."},
        {"role": "system", "content": "Project notes: use tools."},
        {"role": "user", "content": [
            {"type": "text", "text": "Read this and check the weather."},
            {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{corpus.PDF}",
                                      "filename": "report.pdf"}},
            {"type": "text", "text": "Plain text document."}]},
        # Thinking has no input form in Chat Completions: the turn goes on without it.
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_01", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18C, sunny"},
        {"role": "system", "content": "From now on, answer in French."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert sent["reasoning_effort"] == "low"  # a 4,096-token thinking budget
    assert sent["parallel_tool_calls"] is False and sent["tool_choice"] == "auto"
    assert sent["user"] == "user-42"
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": corpus.WEATHER_SCHEMA}}]
    assert "context_management" not in sent and "thinking" not in sent
    # And the answer comes back in Anthropic's shapes, cache usage included.
    message = answer.json()
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 952, "cache_read_input_tokens": 2048,
                                "cache_creation_input_tokens": 0, "output_tokens": 40}


REQUEST_MESSAGES = corpus.ANTHROPIC_REQUEST["messages"]


@pytest.mark.parametrize(("body", "named"), [
    (anthropic_body([{"role": "user", "content": [REQUEST_MESSAGES[0]["content"][3]]}]),
     "A document given by URL"),
    (anthropic_body([{"role": "user", "content": [REQUEST_MESSAGES[0]["content"][5]]}]),
     "'search_result'"),
    (anthropic_body([{"role": "user", "content": [REQUEST_MESSAGES[4]["content"][0]]}]),
     "'made_up_block_2026'"),
    (anthropic_body([{"role": "assistant", "content": [REQUEST_MESSAGES[1]["content"][3]]}]),
     "'server_tool_use'"),
    (anthropic_body([{"role": "user", "content": "hi"}],
                    tools=[corpus.ANTHROPIC_REQUEST["tools"][2]]),
     "'web_search_20250305'"),
    (anthropic_body([{"role": "user", "content": "hi"}], top_k=5), "`top_k`"),
    (anthropic_body([{"role": "user", "content": [REQUEST_MESSAGES[0]["content"][1]]}]),
     "Field `context` of a DocumentPart"),
    (anthropic_body([{"role": "user", "content": "hi"}],
                    context_management={"edits": [{"type": "clear_tool_uses_20250919"}]}),
     "clear_tool_uses_20250919"),
], ids=["url-document", "search-result", "unknown-block", "server-tool-use", "server-tool",
        "top_k", "document-context", "context-edit"])
def test_anthropic_shapes_with_no_counterpart_are_refused(upstream, body, named):
    before = len(upstream.received)
    with serving(upstream) as proxy:
        answer = send(proxy, "anthropic", body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named in error["message"] and "provider oai" in error["message"]
    assert len(upstream.received) == before


def test_openai_shapes_translate_to_anthropic(upstream):
    messages = corpus.OPENAI_REQUEST["messages"]
    body = openai_body(
        [messages[0], messages[1],
         {"role": "user", "content": [messages[2]["content"][0], messages[2]["content"][2]]},
         messages[3], messages[4], messages[5], messages[6],
         {"role": "user", "content": "Compare them."}],
        tools=[corpus.OPENAI_TOOLS[0]], parallel_tool_calls=False, reasoning_effort="low",
        n=1, store=False, max_completion_tokens=4000)
    with serving(upstream) as proxy:
        answer = send(proxy, "openai", body)
    assert answer.status_code == 200, answer.text
    sent = upstream.received[-1]
    assert sent["system"] == "You are a careful agent.\n\nUse tools."
    assert sent["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Look at these."},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": corpus.PDF}, "title": "report.pdf"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather",
             "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1",
             "content": [{"type": "text", "text": "18C"}]},
            {"type": "tool_result", "tool_use_id": "call_2",
             "content": [{"type": "text", "text": "21C"}]}]},
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly from now on."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare them."}]},
    ]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert sent["tools"][0]["strict"] is True
    assert "n" not in sent and "store" not in sent
    # The answer, in OpenAI's shapes: reasoning, text, tool call, cached tokens.
    choice = answer.json()["choices"][0]
    assert choice["message"]["content"] == "Demain, pluie."
    assert choice["message"]["reasoning_content"] == "Tomorrow: rain."
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert answer.json()["usage"]["prompt_tokens"] == 3050
    assert answer.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2000}


OPENAI_PARTS = corpus.OPENAI_REQUEST["messages"][2]["content"]


@pytest.mark.parametrize(("body", "named"), [
    (openai_body([{"role": "user", "content": [OPENAI_PARTS[4]]}]), "'input_audio'"),
    (openai_body([{"role": "user", "content": [OPENAI_PARTS[3]]}]), "'file'"),
    (openai_body([{"role": "user", "content": "hi"}], n=2), "`n` = 2"),
    (openai_body([{"role": "user", "content": "hi"}], seed=7), "`seed`"),
    (openai_body([{"role": "user", "content": "hi"}], logprobs=True), "`logprobs`"),
    (openai_body([{"role": "user", "content": "hi"}], tools=[corpus.OPENAI_TOOLS[1]]),
     "'custom'"),
    (openai_body([{"role": "user", "content": "hi"}], tools=[corpus.OPENAI_TOOLS[0]],
                 tool_choice=corpus.OPENAI_REQUEST["tool_choice"]), "`tool_choice`"),
], ids=["audio", "file-id", "n", "seed", "logprobs", "custom-tool", "allowed-tools"])
def test_openai_shapes_with_no_counterpart_are_refused(upstream, body, named):
    before = len(upstream.received)
    with serving(upstream) as proxy:
        answer = send(proxy, "openai", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "untranslatable"
    assert named in error["message"] and "provider ant" in error["message"]
    assert len(upstream.received) == before


def test_an_anthropic_stream_reaches_an_openai_client(upstream):
    with serving(upstream) as proxy:
        chunks = list(proxy.openai().chat.completions.create(
            model="gpt-via-anthropic", messages=[{"role": "user", "content": "hi"}],
            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert text == "Bonjour le monde" and reasoning == "Let me think."
    assert calls[0].function.name == "get_weather"
    assert "".join(t.function.arguments or "" for t in calls) == "{\"city\": \"Paris\"}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    usage = chunks[-1].usage
    assert usage.prompt_tokens == 4312 and usage.prompt_tokens_details.cached_tokens == 4000


def test_an_openai_stream_reaches_an_anthropic_client(upstream):
    with serving(upstream) as proxy, proxy.anthropic().messages.stream(
            model="claude-via-openai", max_tokens=100,
            messages=[{"role": "user", "content": "hi"}]) as stream:
        message = stream.get_final_message()
    # The second choice (n=2 upstream) has no place in this API; the first is whole.
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "One"
    assert [b.input for b in message.content[1:]] == [{"city": "Oslo"}, {"city": "Bern"}]
    assert message.stop_reason == "tool_use"
    assert message.usage.cache_read_input_tokens == 2048
    assert message.usage.input_tokens == 952


def test_the_usage_chunk_hookproxy_asks_for_reaches_only_a_client_that_asked(upstream):
    body = corpus_request("openai", True)
    del body["stream_options"]
    with serving(upstream) as proxy:
        answer = send(proxy, "openai", body)
    received = upstream.received[-1]
    assert received.pop("stream_options") == {"include_usage": True}  # for the record
    assert received == body
    assert sse_events(answer.content) == [e for e in corpus.OPENAI_STREAM
                                          if b'"usage"' not in e]


# --- a role hookproxy has no name for ---------------------------------------------------

FUNCTION_TURN = {"role": "function", "name": "lookup", "content": "18C in Paris"}


@pytest.mark.parametrize("change", [None, "temperature", "last_text"],
                         ids=["bare", "decoded", "re-encoded"])
def test_a_role_hookproxy_does_not_model_goes_as_it_came(upstream, change):
    """OpenAI's legacy ``function`` role reaches a provider of its format whether the
    request is only peeked (no plugins), decoded, or that very message changed by a
    plugin and encoded again: the two paths agree."""
    messages = [{"role": "user", "content": "Weather in Paris?"}, FUNCTION_TURN]
    with serving(upstream, change) as proxy:
        answer = proxy.openai().chat.completions.create(
            model="gpt-fidelity", messages=messages)
    assert answer.choices[0].message.content
    expected = {**FUNCTION_TURN, "content": "CHANGED"} if change == "last_text" \
        else FUNCTION_TURN
    assert upstream.received[-1]["messages"] == [messages[0], expected]


@pytest.mark.parametrize("change", [None, "temperature"], ids=["bare", "decoded"])
def test_a_role_hookproxy_does_not_model_is_refused_across_formats_naming_it(upstream,
                                                                            change):
    import anthropic
    import openai

    critic = {"role": "critic", "content": "Too long."}
    before = len(upstream.received)
    with serving(upstream, change) as proxy:
        with pytest.raises(openai.BadRequestError) as refused:
            proxy.openai().chat.completions.create(
                model="gpt-via-anthropic",
                messages=[{"role": "user", "content": "Weather?"}, FUNCTION_TURN])
        assert "Message role 'function'" in refused.value.message
        assert "provider ant" in refused.value.message
        with pytest.raises(anthropic.BadRequestError) as rejected:
            proxy.anthropic().messages.create(
                model="claude-via-openai", max_tokens=50,
                messages=[{"role": "user", "content": "Write a poem."}, critic])
        assert "Message role 'critic'" in rejected.value.message
        assert "provider oai" in rejected.value.message
        assert len(upstream.received) == before
        # To its own format, it goes as it came.
        proxy.anthropic().messages.create(
            model="claude-fidelity", max_tokens=50,
            messages=[{"role": "user", "content": "Write a poem."}, critic])
    assert upstream.received[-1]["messages"][-1] == critic
