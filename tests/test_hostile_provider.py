"""A provider that misbehaves on purpose: redirects, oversized and inflating answers,
endless events, invalid UTF-8, stalls. Each case checks what the client got, what the
record says, and that a request alongside it is still served."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.harness import ProxyServer, ServedApp

HI = [{"role": "user", "content": "hello"}]
OK_ANSWER = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                          "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]


@contextmanager
def _proxy_for(handler: Callable[..., Any], tmp_path: Path, kind: str = "openai",
               **limits: Any) -> Iterator[ProxyServer]:
    """A proxy whose model ``m`` is served by ``handler``, and ``mock-1`` by the mock."""
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    with ServedApp({path: handler}) as bad:
        base = f"{bad.url}/v1" if kind == "openai" else bad.url
        config = {"providers": {"bad": {"type": kind, "base_url": base, "timeout": 5,
                                        **limits},
                                "mock": {"type": "mock"}},
                  "models": [{"name": "m", "provider": "bad"},
                             {"name": "mock-1", "provider": "mock"}],
                  "log": {"path": str(tmp_path / "requests.jsonl")},
                  "routing": {"retries": 0}}
        with ProxyServer(config) as proxy:
            yield proxy


def _alongside(proxy: ProxyServer, hostile: Callable[[], Any]) -> Any:
    """Runs ``hostile`` while an ordinary request goes through; returns what it raised."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_caught, hostile)
        reply = proxy.openai().chat.completions.create(model="mock-1", messages=HI)
        assert "hello" in reply.choices[0].message.content
        return future.result(timeout=30)


def _caught(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def _hostile_record(tmp_path: Path) -> dict[str, Any]:
    (record,) = [r for r in _records(tmp_path) if r["model"] == "m"]
    return record


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_redirect_is_not_followed(tmp_path, kind, stream):
    stolen: list[dict[str, Any]] = []

    async def thief(request: web.Request) -> web.Response:
        stolen.append({"headers": dict(request.headers), "body": await request.read()})
        return web.json_response(OK_ANSWER)

    with ServedApp({"/v1/chat/completions": thief, "/v1/messages": thief}) as elsewhere:
        target = f"{elsewhere.url}/v1/messages"

        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=307, headers={"location": target})

        with _proxy_for(redirect, tmp_path, kind, api_key_env="PATH") as proxy:
            if kind == "openai":
                error = _alongside(proxy, lambda: list(proxy.openai().chat.completions.create(
                    model="m", messages=HI, stream=stream)) if stream else
                    proxy.openai().chat.completions.create(model="m", messages=HI))
                assert isinstance(error, openai.APIStatusError)
                assert error.body["type"] == "api_error"  # type: ignore[index]
            else:
                error = _alongside(proxy, lambda: proxy.anthropic().messages.create(
                    model="m", max_tokens=5, messages=HI, stream=stream))
                assert isinstance(error, anthropic.APIStatusError)
                assert error.body["type"] == "error"  # type: ignore[index]
            assert error.status_code == 502
            assert target in error.message and "redirect" in error.message
    assert stolen == []
    record = _hostile_record(tmp_path)
    assert record["status"] == 502
    assert record["attempts"][0]["status"] == 307
    assert record["error"]["type"] == "upstream_redirect"


async def _over_cap_in_pieces(request: web.Request) -> web.StreamResponse:
    # No Content-Length: the cap has to be counted while reading.
    response = web.StreamResponse(headers={"content-type": "application/json"})
    await response.prepare(request)
    for _ in range(100):
        await response.write(b" " * 1000)
    await response.write(json.dumps(OK_ANSWER).encode())
    return response


async def _over_cap_at_once(request: web.Request) -> web.StreamResponse:
    # No Content-Length, and the whole answer in one write (it may all have come before
    # hookproxy reads it).
    response = web.StreamResponse(headers={"content-type": "application/json"})
    await response.prepare(request)
    await response.write(b" " * 30_000 + json.dumps(OK_ANSWER).encode())
    await response.write_eof()
    return response


@pytest.mark.parametrize("handler", [_over_cap_in_pieces, _over_cap_at_once])
def test_an_answer_over_the_size_cap_is_a_502(tmp_path, handler):
    with _proxy_for(handler, tmp_path, max_response_bytes=20_000) as proxy:
        error = _alongside(proxy, lambda: proxy.openai().chat.completions.create(
            model="m", messages=HI))
        assert isinstance(error, openai.InternalServerError) and error.status_code == 502
        assert "larger than 20000 bytes" in error.message
        assert "max_response_bytes" in error.message
    record = _hostile_record(tmp_path)
    assert record["status"] == 502 and record["error"]["type"] == "upstream_too_large"


def test_a_declared_length_over_the_cap_is_refused_before_reading(tmp_path):
    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b" " * 50_000 + json.dumps(OK_ANSWER).encode(),
                            content_type="application/json")

    with _proxy_for(declared, tmp_path, max_response_bytes=20_000) as proxy:
        error = _alongside(proxy, lambda: proxy.openai().chat.completions.create(
            model="m", messages=HI))
        assert isinstance(error, openai.APIStatusError) and error.status_code == 502
        assert "max_response_bytes" in error.message
    assert _hostile_record(tmp_path)["status"] == 502


def test_a_gzip_bomb_stops_at_the_decompressed_cap(tmp_path):
    # 20 MB of spaces compress to about 20 KB.
    bomb = gzip.compress(b"{" + b" " * 20_000_000 + b"}", 9)
    assert len(bomb) < 100_000

    async def inflating(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"content-type": "application/json",
                                                "content-encoding": "gzip"})

    with _proxy_for(inflating, tmp_path, max_decompressed_bytes=1_000_000) as proxy:
        error = _alongside(proxy, lambda: proxy.openai().chat.completions.create(
            model="m", messages=HI))
        assert isinstance(error, openai.APIStatusError) and error.status_code == 502
        assert "max_decompressed_bytes" in error.message
    assert _hostile_record(tmp_path)["status"] == 502


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
def test_a_compressed_answer_within_the_caps_is_read(tmp_path, encoding):
    compress = zlib.compress if encoding == "deflate" else gzip.compress

    async def compressed(request: web.Request) -> web.Response:
        return web.Response(body=compress(json.dumps(OK_ANSWER).encode()),
                            headers={"content-type": "application/json",
                                     "content-encoding": encoding})

    with _proxy_for(compressed, tmp_path) as proxy:
        reply = proxy.openai().chat.completions.create(model="m", messages=HI)
        assert reply.choices[0].message.content == "fine"


def test_an_event_that_never_ends_is_cut_at_the_cap(tmp_path):
    state = {"written": 0, "gone": False}

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: ")
        try:
            for _ in range(2000):  # 2 MB at most, in 1 KB pieces with no blank line
                await response.write(b"x" * 1000)
                state["written"] += 1000
                await __import__("asyncio").sleep(0.001)
        except (ConnectionResetError, RuntimeError):
            state["gone"] = True
        return response

    with _proxy_for(endless, tmp_path, max_event_bytes=50_000) as proxy:
        error = _alongside(proxy, lambda: list(proxy.openai().chat.completions.create(
            model="m", messages=HI, stream=True)))
        assert isinstance(error, openai.APIStatusError) and error.status_code == 502
        assert "max_event_bytes" in error.message
        deadline = time.monotonic() + 10
        while not state["gone"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["gone"] and state["written"] < 1_000_000
    record = _hostile_record(tmp_path)
    assert record["status"] == 502 and record["error"]["type"] == "upstream_too_large"


def test_sse_parsing_is_linear_in_what_arrives():
    import asyncio

    from proxy.sse import iter_sse

    async def chunks() -> Any:
        # 20,000 one-byte reads of one long event, then its end, CRLF split across reads.
        yield b"data: "
        for _ in range(20_000):
            yield b"y"
        yield b"\r"
        yield b"\n\r\n"
        yield b"data: tail\r\n\r\n"

    async def collect() -> list[Any]:
        return [e async for batch in iter_sse(chunks()) for e in batch]

    started = time.process_time()
    events = asyncio.run(collect())
    assert events == [("", b"y" * 20_000), ("", b"tail")]
    assert time.process_time() - started < 5  # quadratic copying took far longer


def test_the_provider_call_stops_when_the_client_leaves_before_the_first_event(tmp_path):
    state = {"gone": False}

    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(100):  # comments only, for 10 s: no event reaches the client
                await response.write(b": thinking\n\n")
                await __import__("asyncio").sleep(0.1)
        except (ConnectionResetError, RuntimeError):
            state["gone"] = True
        return response

    with _proxy_for(stalling, tmp_path) as proxy:
        started = time.monotonic()
        error = _alongside(proxy, lambda: list(proxy.openai(timeout=0.5).chat.completions.create(
            model="m", messages=HI, stream=True)))
        assert isinstance(error, openai.APITimeoutError)
        while not state["gone"] and time.monotonic() - started < 8:
            time.sleep(0.05)
        assert state["gone"]
    record = _hostile_record(tmp_path)
    assert record["status"] == 499 and record["error"]["type"] == "client_disconnected"


def test_the_provider_call_stops_when_the_client_of_a_plain_answer_leaves(tmp_path):
    state = {"called": False, "gone": False}

    async def slow(request: web.Request) -> web.StreamResponse:
        state["called"] = True
        for _ in range(100):  # an answer the client will not wait for, 10 s away
            transport = request.transport
            if transport is None or transport.is_closing():
                state["gone"] = True  # the proxy hung up on this call
                break
            await __import__("asyncio").sleep(0.1)
        return web.json_response(OK_ANSWER)

    with _proxy_for(slow, tmp_path) as proxy:
        started = time.monotonic()
        error = _alongside(proxy, lambda: proxy.openai(timeout=0.5).chat.completions.create(
            model="m", messages=HI))
        assert isinstance(error, openai.APITimeoutError)
        while not state["gone"] and time.monotonic() - started < 8:
            time.sleep(0.05)
        assert state["called"] and state["gone"]
    record = _hostile_record(tmp_path)
    assert record["status"] == 499 and record["error"]["type"] == "client_disconnected"


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_utf8_is_a_502_and_the_record_agrees(tmp_path, stream):
    text = json.dumps(OK_ANSWER).encode().replace(b'"fine"', b'"fi\xff\xfene"')

    async def garbled(request: web.Request) -> web.StreamResponse:
        if not stream:
            return web.Response(body=text, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"id":"x","choices":[{"index":0,"delta":'
                             b'{"content":"\xff\xfe"}}]}\n\n')
        return response

    with _proxy_for(garbled, tmp_path) as proxy:
        error = _alongside(proxy, lambda: list(proxy.openai().chat.completions.create(
            model="m", messages=HI, stream=True)) if stream else
            proxy.openai().chat.completions.create(model="m", messages=HI))
        assert isinstance(error, openai.APIStatusError) and error.status_code == 502
        assert "invalid" in error.message
    record = _hostile_record(tmp_path)
    assert record["status"] == 502


def test_an_error_body_in_invalid_utf8_keeps_the_status(tmp_path):
    async def garbled_error(request: web.Request) -> web.Response:
        return web.Response(status=400, body=b'{"error": {"message": "\xff"}}',
                            content_type="application/json")

    with _proxy_for(garbled_error, tmp_path) as proxy:
        error = _alongside(proxy, lambda: proxy.openai().chat.completions.create(
            model="m", messages=HI))
        assert isinstance(error, openai.BadRequestError)
    assert _hostile_record(tmp_path)["status"] == 400


@pytest.mark.parametrize("model", ["oai/x-drip", "ant/x-drip"])
@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_every_kind_of_stream_stops_the_provider_call_when_the_client_leaves(
        upstream, tmp_path, client, model):
    """Same format (the provider's bytes passed on) and across formats (translated), from
    either SDK: the client leaving mid-stream ends the provider's stream too."""
    from tests.harness import upstream_config

    config = upstream_config(upstream)
    config["providers"]["oai"]["timeout"] = config["providers"]["ant"]["timeout"] = 10
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    with ProxyServer(config) as proxy:
        before = upstream.hung_up

        def leave_midway() -> None:
            if client == "openai":
                stream = proxy.openai().chat.completions.create(model=model, messages=HI,
                                                                stream=True)
                for i, _ in enumerate(stream):
                    if i == 3:
                        break
                stream.close()
            else:
                with proxy.anthropic().messages.stream(model=model, max_tokens=99,
                                                       messages=HI) as events:
                    for i, _ in enumerate(events):
                        if i == 5:
                            break

        assert _alongside(proxy, leave_midway) is None
        deadline = time.monotonic() + 5
        while upstream.hung_up == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.hung_up == before + 1
        proxy.settled(None)
    (record,) = [r for r in _records(tmp_path) if r["model"] == model]
    assert record["status"] == 499 and record["error"]["type"] == "client_disconnected"


def test_cookies_a_provider_sets_are_not_sent_back(tmp_path):
    """A provider's Set-Cookie is not kept: one pooled session serves every client, so a
    cookie sent back would tie one client's requests to another's at the provider."""
    seen: list[str | None] = []

    async def sets_cookies(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cookie"))
        response = web.json_response(OK_ANSWER)
        response.set_cookie("session", f"client-{len(seen)}", path="/")
        return response

    with ServedApp({"/v1/chat/completions": sets_cookies}) as provider:
        # By name, not by address: aiohttp's default jar keeps no cookie for an IP address.
        base = f"http://localhost:{provider.port}/v1"
        config = {"providers": {"p": {"type": "openai", "base_url": base, "timeout": 5}},
                  "models": [{"name": "m", "provider": "p"}], "log": {"path": ""}}
        with ProxyServer(config) as proxy:
            for _ in range(3):
                answer = proxy.openai().chat.completions.create(model="m", messages=HI)
                assert answer.choices[0].message.content == "fine"
    assert seen == [None, None, None]
