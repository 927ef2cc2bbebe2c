"""Wire fidelity: through hookproxy with no plugins, same-format requests and answers
arrive JSON-equal on the other side and streams byte for byte; with a plugin that changes
one field, only that field differs. Across formats, each shape translates or is refused
with a 400 naming it and the provider. The shapes are in tests/corpus.py."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy import RequestContext, Response, TextDelta, TextPart, hookimpl
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
