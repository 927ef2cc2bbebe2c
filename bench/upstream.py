"""A fast fake LLM provider for the benchmark: both wire formats, streaming included.

A raw ASGI app on uvicorn (httptools, uvloop) with answers built once, so that it costs
as little as possible and the proxies in front of it are what gets measured. A streaming
request gets ``max_tokens`` chunks (200 when it does not say).
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import uvicorn

_decode = msgspec.json.decode
_encode = msgspec.json.encode

OPENAI_ANSWER = _encode({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, benchmark!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}})
ANTHROPIC_ANSWER = _encode({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench",
    "content": [{"type": "text", "text": "Hello, benchmark!"}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 20, "output_tokens": 4}})


def _openai_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + _encode({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
        "model": "bench", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }) + b"\n\n"


OPENAI_FIRST = _openai_chunk({"role": "assistant", "content": ""})
OPENAI_WORD = _openai_chunk({"content": "word "})
OPENAI_LAST = (_openai_chunk({}, "stop") + b"data: " + _encode({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "bench",
    "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 200,
                             "total_tokens": 220}}) + b"\n\ndata: [DONE]\n\n")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode({"type": event, **data}) + b"\n\n"


ANTHROPIC_FIRST = _sse("message_start", {"message": {
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench", "content": [],
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 20, "output_tokens": 1}}}) + _sse(
    "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
ANTHROPIC_WORD = _sse("content_block_delta", {"index": 0, "delta": {
    "type": "text_delta", "text": "word "}})
ANTHROPIC_LAST = (_sse("content_block_stop", {"index": 0}) + _sse("message_delta", {
    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    "usage": {"output_tokens": 200}}) + _sse("message_stop", {}))

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    anthropic = scope["path"].endswith("/messages")
    if b'"stream":true' not in body.replace(b" ", b""):
        answer = ANTHROPIC_ANSWER if anthropic else OPENAI_ANSWER
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": answer})
        return
    chunks = int(_decode(body).get("max_tokens") or 200)
    first, word, last = ((ANTHROPIC_FIRST, ANTHROPIC_WORD, ANTHROPIC_LAST) if anthropic
                         else (OPENAI_FIRST, OPENAI_WORD, OPENAI_LAST))
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    for _ in range(chunks):
        await send({"type": "http.response.body", "body": word, "more_body": True})
    await send({"type": "http.response.body", "body": last})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop")
