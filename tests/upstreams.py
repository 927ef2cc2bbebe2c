"""Fake providers on loopback: real aiohttp servers speaking the OpenAI and Anthropic wire
formats, streaming included, that record what reached them. Anthropic's
``/v1/messages/count_tokens`` answers ``COUNTED_TOKENS``.

Behaviour is picked by the model name the proxy sends:
  ``*-status-NNN``   answers with HTTP status NNN and an error body in the API's format
  ``*-slow``         waits 3 s before answering (for timeouts)
  ``*-delay-NNN``    waits NNN milliseconds before answering
  ``*-cut``          streams a little, then drops the connection
  ``*-drip``         streams a word every 0.1 s; counts in ``hung_up`` the streams the
                     proxy abandoned midway
  a script           ``upstream.script(model, [503, "drop", (429, "0.2"), "ok"])``: the next
                     requests for that model fail with a status (and a Retry-After for
                     429, a message otherwise), drop
                     the connection, or go on as usual, one entry per request
  anything else      answers ``echo: <last user text>``, or calls the first tool if the
                     request has tools and its last message is not a tool result
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

TOOL_ARGUMENTS = {"city": "Paris", "unit": "celsius"}
# What the fake Anthropic count_tokens endpoint answers.
COUNTED_TOKENS = 4242


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        text = content if isinstance(content, str) else "".join(
            b.get("text", "") for b in content if b.get("type") == "text")
        if text:
            return text
    return ""


def _wants_tool(body: dict[str, Any], fmt: str) -> bool:
    if not body.get("tools"):
        return False
    last = body["messages"][-1]
    if fmt == "openai":
        return last.get("role") != "tool"
    content = last.get("content")
    return not (isinstance(content, list) and any(
        b.get("type") == "tool_result" for b in content))


class FakeUpstream:
    """One aiohttp app serving both /v1/chat/completions and /v1/messages."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        self.scripts: dict[str, list[Any]] = {}
        self.hung_up = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> dict[str, Any]:
        return self.received[-1]

    def script(self, model: str, steps: list[Any]) -> None:
        self.scripts[model] = list(steps)

    def count(self, model: str) -> int:
        return sum(1 for body in self.received if body.get("model") == model)

    def times_for(self, model: str) -> list[float]:
        return [t for t, body in zip(self.times, self.received, strict=True)
                if body.get("model") == model]

    # --- shared behaviour ---------------------------------------------------------------

    async def _common(self, request: web.Request, fmt: str
                      ) -> tuple[dict[str, Any], web.StreamResponse | None]:
        body = await request.json()
        self.received.append(body)
        self.headers.append(dict(request.headers))
        self.times.append(time.monotonic())
        model = str(body.get("model", ""))
        steps = self.scripts.get(model)
        step = steps.pop(0) if steps else "ok"
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return body, web.Response(status=500)
        status, retry_after = (step if isinstance(step, tuple) else (step, None))
        if status == "ok" and "-status-" in model:
            status = int(model.rsplit("-", 1)[1])
        if isinstance(status, int):
            message = f"fake upstream says {status}"
            if retry_after and status != 429:
                message, retry_after = f"{message}: {retry_after}", None
            payload = ({"error": {"message": message, "type": "test_error", "code": None}}
                       if fmt == "openai" else
                       {"type": "error", "error": {"type": "test_error", "message": message}})
            headers = {"retry-after": retry_after or "1"} if status == 429 else {}
            return body, web.json_response(payload, status=status, headers=headers)
        if model.endswith("-slow"):
            await asyncio.sleep(3)
            if request.transport is None or request.transport.is_closing():
                self.hung_up += 1
        if "-delay-" in model:
            await asyncio.sleep(int(model.rsplit("-", 1)[1]) / 1000)
        return body, None

    async def _words(self, request: web.Request, model: str, text: str,
                     send: Callable[[str], Awaitable[None]]) -> bool:
        """Streams ``text`` word by word through ``send``. ``*-drip``: a word every 0.1 s,
        30 times over, stopping when the proxy hangs up (counted in ``hung_up``);
        ``*-cut``: the connection drops after two words. False when it ended early."""
        words = _pieces(text) * (30 if model.endswith("-drip") else 1)
        for i, word in enumerate(words):
            if model.endswith("-drip"):
                await asyncio.sleep(0.1)
                if request.transport is None or request.transport.is_closing():
                    self.hung_up += 1
                    return False
            await send(word)
            if model.endswith("-cut") and i == 1:
                assert request.transport is not None
                # What was sent reaches the proxy first, even on a busy machine: a cut read
                # in the same batch as the words can be reported before them.
                await asyncio.sleep(0.2)
                request.transport.close()
                return False
        return True

    # --- OpenAI -------------------------------------------------------------------------

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._common(request, "openai")
        if early is not None:
            return early
        model = body["model"]
        text = "echo: " + _last_user_text(body["messages"])
        tool = body["tools"][0]["function"]["name"] if _wants_tool(body, "openai") else None
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if tool else text}
            if tool:
                message["tool_calls"] = [{"id": "call_fake1", "type": "function", "function": {
                    "name": tool, "arguments": json.dumps(TOOL_ARGUMENTS)}}]
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tool else "stop"}],
                "usage": usage})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                     "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": ""})
        if tool:
            await send({"tool_calls": [{"index": 0, "id": "call_fake1", "type": "function",
                                        "function": {"name": tool, "arguments": ""}}]})
            arguments = json.dumps(TOOL_ARGUMENTS)
            for piece in (arguments[:10], arguments[10:]):
                await send({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            if not await self._words(request, model, text,
                                     lambda word: send({"content": word})):
                return response
        await send({}, "tool_calls" if tool else "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                     "model": model, "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # --- Anthropic ----------------------------------------------------------------------

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._common(request, "anthropic")
        if early is not None:
            return early
        model = body["model"]
        text = "echo: " + _last_user_text(body["messages"])
        tool = body["tools"][0]["name"] if _wants_tool(body, "anthropic") else None
        if not body.get("stream"):
            content: list[dict[str, Any]] = (
                [{"type": "tool_use", "id": "toolu_fake1", "name": tool, "input": TOOL_ARGUMENTS}]
                if tool else [{"type": "text", "text": text}])
            return web.json_response({
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": "tool_use" if tool else "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 13, "output_tokens": 5},
                "x_fake_extra": "kept"})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(
                f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())

        await send("message_start", {"message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 13, "output_tokens": 1}}})
        await send("ping", {})
        if tool:
            await send("content_block_start", {"index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_fake1", "name": tool, "input": {}}})
            arguments = json.dumps(TOOL_ARGUMENTS)
            for piece in (arguments[:10], arguments[10:]):
                await send("content_block_delta", {"index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": piece}})
        else:
            await send("content_block_start", {"index": 0, "content_block": {
                "type": "text", "text": ""}})
            if not await self._words(request, model, text, lambda word: send(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": word}})):
                return response
        await send("content_block_stop", {"index": 0})
        await send("message_delta", {
            "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 5}})
        await send("message_stop", {})
        await response.write_eof()
        return response

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages/count_tokens``: ``COUNTED_TOKENS`` for any request (the
        model-name behaviours above apply)."""
        _, early = await self._common(request, "anthropic")
        return early or web.json_response({"input_tokens": COUNTED_TOKENS})


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
