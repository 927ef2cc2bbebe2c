"""A local, deterministic provider: no network, no key. It answers, streams and calls tools
so that a fresh install works end to end with either SDK."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from proxy.canonical import (
    Request,
    Response,
    StreamEvent,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
    response_events,
)
from proxy.config import ProviderConfig
from proxy.formats import responses as responses_format

_WORDS = re.compile(r"\S+\s*")
_encode = msgspec.json.Encoder().encode


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def estimate_request_tokens(request: Request) -> int:
    """A rough count of a request's input tokens, at about four characters a token: its
    system prompt and message text, tool results, the calls it made and its tool
    definitions. Images and documents are not measured. An estimate, not any model's
    tokenizer: it can be off by a good margin either way."""
    chars = len(request.prompt_text())
    for message in request.messages:
        for part in message.content:
            if isinstance(part, ToolCallPart):
                chars += len(part.name) + len(part.arguments)
    if request.tools:
        chars += len(_encode(request.tools))
    return max(1, chars // 4)


def _placeholder(schema: dict[str, Any]) -> object:
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    return {"string": "mock", "integer": 1, "number": 1, "boolean": True,
            "array": [], "object": {}}.get(kind if isinstance(kind, str) else "")


class MockProvider:
    format = "mock"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.chunk_delay = config.chunk_delay

    def answer(self, request: Request, model: str) -> Response:
        prompt = request.prompt_text()
        digest = hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:24]
        last = request.messages[-1] if request.messages else None
        answered_tool = last is not None and any(
            isinstance(p, ToolResultPart) for p in last.content)
        choice = request.tool_choice
        content: list[TextPart | ToolCallPart]
        if request.tools and not answered_tool and (choice is None or choice.mode != "none"):
            tool = request.tools[0]
            if choice is not None and choice.mode == "tool":
                tool = next((t for t in request.tools if t.name == choice.name), tool)
            properties = tool.parameters.get("properties") or {}
            arguments = {name: _placeholder(properties.get(name) or {})
                         for name in tool.parameters.get("required") or ()}
            content = [ToolCallPart(id=f"call_{digest[:16]}", name=tool.name,
                                    arguments=msgspec.json.encode(arguments).decode())]
            finish = "tool_calls"
        else:
            said = last.text if last is not None else ""
            if answered_tool and last is not None:
                said = " ".join(p.text for r in last.content if isinstance(r, ToolResultPart)
                                for p in r.content if isinstance(p, TextPart))
                text = f"The tool returned: {said[:200]}"
            else:
                text = f"Mock answer from {model}. You said: {said[:200]}"
            content = [TextPart(text=text)]
            finish = "stop"
        if request.max_tokens is not None and isinstance(content[0], TextPart):
            words = _WORDS.findall(content[0].text)
            if len(words) > request.max_tokens:
                content = [TextPart(text="".join(words[: request.max_tokens]).rstrip())]
                finish = "length"
        output = sum(estimate_tokens(p.text if isinstance(p, TextPart) else p.arguments)
                     for p in content)
        return Response(
            id=f"mock-{digest}",
            model=model,
            content=[*content],
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(input_tokens=estimate_tokens(prompt), output_tokens=output),
        )

    def _answer(self, request: Request, model: str, client_format: str) -> Response:
        if client_format == responses_format.NAME:
            # What an HTTP provider could not take (a built-in tool...) is refused here too.
            request = responses_format.for_format(request, self.format)
        return self.answer(request, model)

    async def complete(self, request: Request, model: str, client_format: str,
                       raw_body: bytes | None = None,
                       plugin_headers: dict[str, str] | None = None
                       ) -> tuple[Response, bytes | None]:
        return self._answer(request, model, client_format), None

    async def stream(self, request: Request, model: str, client_format: str,
                     raw_body: bytes | None = None,
                     plugin_headers: dict[str, str] | None = None
                     ) -> AsyncIterator[list[StreamEvent]]:
        events: list[StreamEvent] = []
        for event in response_events(self._answer(request, model, client_format)):
            if not isinstance(event, TextDelta):
                events.append(event)
                continue
            for word in _WORDS.findall(event.text) or [event.text]:
                events.append(TextDelta(index=event.index, text=word))
        if not self.chunk_delay:
            yield events
            return
        for event in events:
            await asyncio.sleep(self.chunk_delay)
            yield [event]
