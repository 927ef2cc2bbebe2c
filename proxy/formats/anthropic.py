"""Anthropic Messages wire format, both ways.

Client side: ``decode_request`` and ``encode_response`` / ``StreamEncoder``.
Provider side: ``encode_request`` and ``decode_response`` / ``StreamDecoder``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from proxy.canonical import (
    FinishReason,
    ImagePart,
    Message,
    Part,
    Request,
    Response,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TextDelta,
    TextPart,
    Tool,
    ToolCallDelta,
    ToolCallPart,
    ToolCallStart,
    ToolChoice,
    ToolResultPart,
    Usage,
)
from proxy.errors import BadRequest, ProxyError, UpstreamError, error_type
from proxy.formats.common import decode_json, known_extra

NAME = "anthropic"
DEFAULT_MAX_TOKENS = 4096
_encode = msgspec.json.Encoder().encode
# JSON output has no request field in this API: a client that asked for JSON is told so.
JSON_INSTRUCTION = "Respond with a single valid JSON value and nothing else."


class _Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class _MessagesRequest(msgspec.Struct):
    model: str
    messages: list[_Message]
    max_tokens: int | None = None
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None


_REQUEST_FIELDS = frozenset(_MessagesRequest.__struct_fields__) - {"metadata"}
_MESSAGE_FIELDS = frozenset({"role", "content"})
_TOOL_FIELDS = frozenset({"name", "description", "input_schema"})

_FINISH_IN: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_OUT: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish: str, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence else _FINISH_OUT.get(finish, "end_turn")


# --- client request -> canonical --------------------------------------------------------


def decode_request(body: bytes) -> Request:
    raw = decode_json(body)
    try:
        wire = msgspec.convert(raw, _MessagesRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from None
    if wire.max_tokens is None:
        raise BadRequest("Invalid request: Object missing required field `max_tokens`")
    messages = [
        Message(role=m.role, content=_blocks(m.content, f"messages[{i}].content"),
                extra=known_extra(raw_m, _MESSAGE_FIELDS))
        for i, (m, raw_m) in enumerate(zip(wire.messages, raw["messages"], strict=True))
    ]
    system = [p for p in _blocks(wire.system, "system") if isinstance(p, TextPart)]
    extra = known_extra(raw, _REQUEST_FIELDS)
    user = (wire.metadata or {}).get("user_id")
    return Request(
        model=wire.model,
        messages=messages,
        system=system,
        tools=[_decode_tool(t, i) for i, t in enumerate(wire.tools or ())],
        tool_choice=_decode_tool_choice(wire.tool_choice),
        max_tokens=wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=list(wire.stop_sequences or ()),
        stream=bool(wire.stream),
        stream_usage=True,
        user=user if isinstance(user, str) else None,
        extra=extra,
    )


def _blocks(content: str | list[dict[str, Any]] | None, where: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(text=content)]
    if not isinstance(content, list):
        raise BadRequest(f"Invalid request: Expected `str | array` at `$.{where}`")
    parts: list[Part] = []
    for j, block in enumerate(content):
        parts.append(_block(block, f"{where}[{j}]"))
    return parts


def _require(block: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = block.get(key)
    if not isinstance(value, kind):
        name = kind.__name__
        raise BadRequest(f"Invalid request: Expected `{name}` at `$.{where}.{key}`")
    return value


def _block(block: dict[str, Any], where: str) -> Part:
    if not isinstance(block, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.{where}`")
    kind = block.get("type")
    if kind == "text":
        text = _require(block, "text", str, where)
        return TextPart(text=text, extra=known_extra(block, {"type", "text"}))
    if kind == "image":
        source = _require(block, "source", dict, where)
        extra = known_extra(block, {"type", "source"})
        if source.get("type") == "url":
            return ImagePart(url=_require(source, "url", str, f"{where}.source"), extra=extra)
        return ImagePart(
            media_type=_require(source, "media_type", str, f"{where}.source"),
            data=_require(source, "data", str, f"{where}.source"),
            extra=extra,
        )
    if kind == "tool_use":
        return ToolCallPart(
            id=_require(block, "id", str, where),
            name=_require(block, "name", str, where),
            arguments=_encode(block.get("input") or {}).decode(),
            extra=known_extra(block, {"type", "id", "name", "input"}),
        )
    if kind == "tool_result":
        content = [
            p for p in _blocks(block.get("content"), f"{where}.content")
            if isinstance(p, TextPart | ImagePart)
        ]
        return ToolResultPart(
            tool_call_id=_require(block, "tool_use_id", str, where),
            content=content,
            is_error=bool(block.get("is_error")),
            extra=known_extra(block, {"type", "tool_use_id", "content", "is_error"}),
        )
    raise BadRequest(f"Content block type {kind!r} at `$.{where}` is not supported")


def _decode_tool(tool: dict[str, Any], index: int) -> Tool:
    name = _require(tool, "name", str, f"tools[{index}]")
    return Tool(
        name=name,
        description=tool.get("description") or "",
        parameters=tool.get("input_schema") or {},
        extra=known_extra(tool, _TOOL_FIELDS),
    )


def _decode_tool_choice(choice: dict[str, Any] | None) -> ToolChoice | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if not isinstance(kind, str):
        raise BadRequest("Invalid request: Expected `str` at `$.tool_choice.type`")
    if kind == "tool":
        return ToolChoice(mode="tool", name=_require(choice, "name", str, "tool_choice"))
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in modes:
        raise BadRequest(f"Invalid request: unknown tool_choice type {kind!r}")
    return ToolChoice(mode=modes[kind])  # type: ignore[arg-type]


# --- canonical -> provider request ------------------------------------------------------


def encode_request(
    request: Request, model: str, *, same_format: bool, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> bytes:
    body: dict[str, Any] = dict(request.extra) if same_format else {}
    body["model"] = model
    body["max_tokens"] = request.max_tokens or default_max_tokens
    system = [_encode_part(p, same_format) for p in request.system]
    if request.response_format and request.response_format.get("type") != "text":
        system.append({"type": "text", "text": JSON_INSTRUCTION})
    if system:
        simple = all(len(block) == 2 for block in system)
        body["system"] = "\n\n".join(b["text"] for b in system) if simple else system
    body["messages"] = _encode_messages(request.messages, same_format)
    if request.tools:
        body["tools"] = [_encode_tool(t, same_format) for t in request.tools]
    if request.tool_choice is not None:
        choice = request.tool_choice
        kinds = {"auto": "auto", "required": "any", "none": "none", "tool": "tool"}
        wire_choice: dict[str, Any] = {"type": kinds[choice.mode]}
        if choice.mode == "tool":
            wire_choice["name"] = choice.name
        body["tool_choice"] = wire_choice
    if request.temperature is not None:
        # OpenAI allows up to 2; Anthropic up to 1.
        body["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = request.stop
    if request.user and "metadata" not in body:
        body["metadata"] = {"user_id": request.user}
    if request.stream:
        body["stream"] = True
    return _encode(body)


def _encode_messages(messages: list[Message], same_format: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        blocks = [_encode_part(p, same_format) for p in message.content]
        # This API wants turns to alternate: consecutive turns of one role become one.
        if out and out[-1]["role"] == message.role and not message.extra:
            out[-1]["content"].extend(blocks)
            continue
        wire: dict[str, Any] = dict(message.extra) if same_format else {}
        wire["role"] = message.role
        wire["content"] = blocks
        out.append(wire)
    return out


def _encode_part(part: Part, same_format: bool) -> dict[str, Any]:
    block: dict[str, Any] = dict(part.extra) if same_format else {}
    if isinstance(part, TextPart):
        block.update(type="text", text=part.text)
    elif isinstance(part, ImagePart):
        source = (
            {"type": "url", "url": part.url} if part.url
            else {"type": "base64", "media_type": part.media_type, "data": part.data}
        )
        block.update(type="image", source=source)
    elif isinstance(part, ToolCallPart):
        block.update(type="tool_use", id=part.id, name=part.name,
                     input=_arguments(part.arguments))
    else:
        block.update(type="tool_result", tool_use_id=part.tool_call_id,
                     content=[_encode_part(p, same_format) for p in part.content])
        if part.is_error:
            block["is_error"] = True
    return block


def _arguments(arguments: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _encode_tool(tool: Tool, same_format: bool) -> dict[str, Any]:
    wire: dict[str, Any] = dict(tool.extra) if same_format else {}
    wire["name"] = tool.name
    if tool.description:
        wire["description"] = tool.description
    wire["input_schema"] = tool.parameters or {"type": "object", "properties": {}}
    return wire


# --- provider response -> canonical ------------------------------------------------------


class _WireUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0


class _WireResponse(msgspec.Struct):
    content: list[dict[str, Any]]
    id: str = ""
    model: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: _WireUsage | None = None


_RESPONSE_FIELDS = frozenset(
    {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
)


def decode_response(body: bytes) -> Response:
    try:
        raw = msgspec.json.decode(body)
        wire = msgspec.convert(raw, _WireResponse)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise UpstreamError(502, f"Provider sent an invalid response: {exc}") from None
    content: list[TextPart | ToolCallPart] = []
    for block in wire.content:
        if block.get("type") == "text":
            content.append(TextPart(text=block.get("text") or ""))
        elif block.get("type") == "tool_use":
            content.append(ToolCallPart(id=block.get("id", ""), name=block.get("name", ""),
                                        arguments=_encode(block.get("input") or {}).decode()))
    usage = wire.usage or _WireUsage()
    return Response(
        id=wire.id,
        model=wire.model,
        content=content,
        finish_reason=_FINISH_IN.get(wire.stop_reason, "stop"),
        usage=Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens),
        stop_sequence=wire.stop_sequence,
        extra=known_extra(raw, _RESPONSE_FIELDS),
    )


# --- canonical -> client response -------------------------------------------------------


def _message_id(response_id: str) -> str:
    return response_id if response_id.startswith("msg") else f"msg_{response_id}"


def encode_response(response: Response, *, same_format: bool) -> bytes:
    content: list[dict[str, Any]] = []
    for part in response.content:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        else:
            content.append({"type": "tool_use", "id": part.id, "name": part.name,
                            "input": _arguments(part.arguments)})
    body: dict[str, Any] = dict(response.extra) if same_format else {}
    body.update(
        id=_message_id(response.id),
        type="message",
        role="assistant",
        model=response.model,
        content=content,
        stop_reason=_stop_reason(response.finish_reason, response.stop_sequence),
        stop_sequence=response.stop_sequence,
        usage={"input_tokens": response.usage.input_tokens,
               "output_tokens": response.usage.output_tokens},
    )
    return _encode(body)


def encode_error(error: ProxyError) -> bytes:
    return _encode({"type": "error",
                    "error": {"type": error_type(error.status), "message": error.message}})


# --- streaming --------------------------------------------------------------------------


class StreamDecoder:
    """Turns a provider's SSE events into canonical stream events."""

    def __init__(self, request: Request | None = None, same_format: bool = False) -> None:
        self.ended = False
        self.index: dict[int, int] = {}  # provider block index -> canonical index
        self.finish: FinishReason = "stop"
        self.stop_sequence: str | None = None
        self.usage = Usage()

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        try:
            payload = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(502, f"Provider sent a malformed stream event: {exc}") from None
        if not isinstance(payload, dict):
            raise UpstreamError(502, "Provider sent a malformed stream event")
        kind = payload.get("type", event)
        if kind == "content_block_delta":
            index = self.index.get(payload.get("index", 0))
            delta = payload.get("delta") or {}
            if index is None:
                return []
            if delta.get("type") == "text_delta":
                return [TextDelta(index=index, text=delta.get("text", ""))]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                return [ToolCallDelta(index=index, arguments=delta["partial_json"])]
            return []
        if kind == "content_block_start":
            block = payload.get("content_block") or {}
            if block.get("type") not in ("text", "tool_use"):
                return []  # thinking and server-tool blocks have no canonical form
            index = self.index[payload.get("index", 0)] = len(self.index)
            if block["type"] == "tool_use":
                return [ToolCallStart(index=index, id=block.get("id", ""),
                                      name=block.get("name", ""))]
            return [TextDelta(index=index, text=block.get("text", ""))]
        if kind == "message_start":
            message = payload.get("message") or {}
            usage = message.get("usage") or {}
            self.usage.input_tokens = usage.get("input_tokens") or 0
            return [StreamStart(id=message.get("id", ""), model=message.get("model", ""),
                                usage=Usage(input_tokens=self.usage.input_tokens))]
        if kind == "message_delta":
            delta = payload.get("delta") or {}
            self.finish = _FINISH_IN.get(delta.get("stop_reason"), "stop")
            self.stop_sequence = delta.get("stop_sequence")
            usage = payload.get("usage") or {}
            self.usage.output_tokens = usage.get("output_tokens") or 0
            if usage.get("input_tokens"):
                self.usage.input_tokens = usage["input_tokens"]
            return []
        if kind == "message_stop":
            return self.finish_events()
        if kind == "error":
            error = payload.get("error") or {}
            raise UpstreamError(502, f"Provider error mid-stream: {error.get('message', error)}")
        return []  # ping, content_block_stop and events added later

    def finish_events(self) -> list[StreamEvent]:
        if self.ended:
            return []
        self.ended = True
        return [StreamEnd(finish_reason=self.finish, usage=self.usage,
                          stop_sequence=self.stop_sequence)]

    def close(self) -> list[StreamEvent]:
        if not self.ended:
            raise UpstreamError(502, "Provider stream ended before the answer was complete")
        return []


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


class StreamEncoder:
    """Turns canonical stream events into the client's SSE events."""

    media_type = "text/event-stream"

    def __init__(self, request: Request) -> None:
        self.model = request.model
        self.open: int | None = None  # canonical index of the open block
        self.blocks = 0
        self.text_prefix = b""

    def _start_block(self, index: int, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open = index
        self.blocks += 1
        return out + _sse("content_block_start", {
            "type": "content_block_start", "index": self.blocks - 1, "content_block": block})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return _sse("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})

    def encode(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):
            out = b""
            if self.open != event.index:
                out = self._start_block(event.index, {"type": "text", "text": ""})
                # Text deltas are most of a stream: their event is a template around the text.
                self.text_prefix = (b'event: content_block_delta\ndata: {"type":'
                                    b'"content_block_delta","index":'
                                    + str(self.blocks - 1).encode()
                                    + b',"delta":{"type":"text_delta","text":')
            return out + self.text_prefix + _encode(event.text) + b"}}\n\n"
        if isinstance(event, ToolCallDelta):
            return _sse("content_block_delta", {
                "type": "content_block_delta", "index": self.blocks - 1,
                "delta": {"type": "input_json_delta", "partial_json": event.arguments}})
        if isinstance(event, ToolCallStart):
            return self._start_block(event.index, {
                "type": "tool_use", "id": event.id, "name": event.name, "input": {}})
        if isinstance(event, StreamStart):
            return _sse("message_start", {"type": "message_start", "message": {
                "id": _message_id(event.id), "type": "message", "role": "assistant",
                "model": event.model or self.model, "content": [], "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": event.usage.input_tokens, "output_tokens": 0},
            }})
        return self._close() + _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(event.finish_reason, event.stop_sequence),
                      "stop_sequence": event.stop_sequence},
            "usage": {"input_tokens": event.usage.input_tokens,
                      "output_tokens": event.usage.output_tokens},
        }) + _sse("message_stop", {"type": "message_stop"})

    def encode_error(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + encode_error(error) + b"\n\n"
