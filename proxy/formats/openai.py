"""OpenAI Chat Completions wire format, both ways.

Client side: ``decode_request`` and ``encode_response`` / ``StreamEncoder``.
Provider side: ``encode_request`` and ``decode_response`` / ``StreamDecoder``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from proxy.canonical import (
    FinishReason,
    ImagePart,
    Message,
    Part,
    Request,
    Response,
    Role,
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
from proxy.formats.common import decode_json, known_extra, parse_data_url

NAME = "openai"
_encode = msgspec.json.Encoder().encode

# --- wire types, used to validate what arrives (unknown fields are kept separately) ---


class _Function(msgspec.Struct):
    name: str
    arguments: str | dict[str, Any] = "{}"


class _ToolCall(msgspec.Struct):
    id: str
    function: _Function
    type: str = "function"


class _Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _ChatRequest(msgspec.Struct):
    model: str
    messages: list[_Message]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


_REQUEST_FIELDS = frozenset(_ChatRequest.__struct_fields__) - {"max_completion_tokens"}
_MESSAGE_FIELDS = frozenset(_Message.__struct_fields__)
_TOOL_FUNCTION_FIELDS = frozenset({"name", "description", "parameters"})

_FINISH_IN: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


# --- client request -> canonical --------------------------------------------------------


def decode_request(body: bytes) -> Request:
    raw = decode_json(body)
    try:
        wire = msgspec.convert(raw, _ChatRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from None
    system: list[TextPart] = []
    messages: list[Message] = []
    for i, (message, raw_message) in enumerate(zip(wire.messages, raw["messages"], strict=True)):
        extra = known_extra(raw_message, _MESSAGE_FIELDS)
        if message.role in ("system", "developer"):
            text_extra = {"role": message.role} if message.role == "developer" else {}
            system.extend(TextPart(text=p.text, extra=text_extra)
                          for p in _content_parts(message.content, i) if isinstance(p, TextPart))
            continue
        if message.role == "tool":
            result = ToolResultPart(
                tool_call_id=message.tool_call_id or "",
                content=[p for p in _content_parts(message.content, i)
                         if isinstance(p, TextPart | ImagePart)],
            )
            # Consecutive tool results answer one assistant turn: keep them in one message.
            if messages and messages[-1].role == "user" and all(
                isinstance(p, ToolResultPart) for p in messages[-1].content
            ):
                messages[-1].content.append(result)
            else:
                messages.append(Message(role="user", content=[result]))
            continue
        parts = _content_parts(message.content, i)
        for call in message.tool_calls or ():
            arguments = call.function.arguments
            if not isinstance(arguments, str):
                arguments = _encode(arguments).decode()
            parts.append(ToolCallPart(id=call.id, name=call.function.name, arguments=arguments))
        role: Role = "assistant" if message.role == "assistant" else "user"
        messages.append(Message(role=role, content=parts, name=message.name, extra=extra))

    extra = known_extra(raw, _REQUEST_FIELDS)
    stop = wire.stop
    return Request(
        model=wire.model,
        messages=messages,
        system=system,
        tools=[_decode_tool(t, i) for i, t in enumerate(wire.tools or ())],
        tool_choice=_decode_tool_choice(wire.tool_choice),
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stream=bool(wire.stream),
        stream_usage=bool((wire.stream_options or {}).get("include_usage")),
        response_format=wire.response_format,
        user=wire.user,
        extra=extra,
    )


def _content_parts(content: str | list[dict[str, Any]] | None, index: int) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(text=content)]
    parts: list[Part] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        where = f"messages[{index}].content[{j}]"
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.text`")
            parts.append(TextPart(text=text, extra=known_extra(part, {"type", "text"})))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.image_url.url`")
            media_type, data = parse_data_url(url)
            extra = known_extra(image, {"url"}) if isinstance(image, dict) else {}
            parts.append(ImagePart(url="" if data else url, media_type=media_type, data=data,
                                   extra=extra))
        else:
            raise BadRequest(f"Content part type {kind!r} at `$.{where}` is not supported")
    return parts


def _decode_tool(tool: dict[str, Any], index: int) -> Tool:
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise BadRequest(f"Invalid request: `$.tools[{index}]` must be a function tool")
    name = function.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.tools[{index}].function.name`")
    return Tool(
        name=name,
        description=function.get("description") or "",
        parameters=function.get("parameters") or {},
        extra=known_extra(function, _TOOL_FUNCTION_FIELDS),
    )


def _decode_tool_choice(choice: str | dict[str, Any] | None) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise BadRequest(f"Invalid request: unknown tool_choice {choice!r}")
        return ToolChoice(mode=choice)  # type: ignore[arg-type]
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest("Invalid request: Expected `str` at `$.tool_choice.function.name`")
    return ToolChoice(mode="tool", name=name)


# --- canonical -> provider request ------------------------------------------------------


def encode_request(request: Request, model: str, *, same_format: bool) -> bytes:
    messages: list[dict[str, Any]] = []
    for part in request.system:
        messages.append({"role": part.extra.get("role", "system"), "content": part.text})
    for message in request.messages:
        messages.extend(_encode_message(message, same_format))
    body: dict[str, Any] = dict(request.extra) if same_format else {}
    body["model"] = model
    body["messages"] = messages
    if request.tools:
        body["tools"] = [_encode_tool(t, same_format) for t in request.tools]
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if choice.mode == "tool" else choice.mode
        )
    if request.max_tokens is not None:
        # A client that said max_completion_tokens keeps its word (newer OpenAI models
        # refuse max_tokens); everything else gets the key every compatible server knows.
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        body[key] = request.max_tokens
    _put(body, "temperature", request.temperature)
    _put(body, "top_p", request.top_p)
    if request.stop:
        body["stop"] = request.stop
    _put(body, "response_format", request.response_format)
    _put(body, "user", request.user)
    if request.stream:
        body["stream"] = True
        # Always ask for usage: the log needs it; the client gets it only if it asked.
        body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    return _encode(body)


def _put(body: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        body[key] = value


def _encode_message(message: Message, same_format: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ToolResultPart):
            out.append({
                "role": "tool",
                "tool_call_id": part.tool_call_id,
                "content": _simple_content([_encode_part(p, same_format) for p in part.content]),
            })
        elif isinstance(part, ToolCallPart):
            tool_calls.append({
                "id": part.id,
                "type": "function",
                "function": {"name": part.name, "arguments": part.arguments},
            })
        else:
            content.append(_encode_part(part, same_format))
    if content or tool_calls or not out:
        wire: dict[str, Any] = dict(message.extra) if same_format else {}
        wire["role"] = message.role
        wire["content"] = _simple_content(content) if content or not tool_calls else None
        if tool_calls:
            wire["tool_calls"] = tool_calls
        if message.name:
            wire["name"] = message.name
        out.append(wire)
    return out


def _simple_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Plain text goes out as a string, which every OpenAI-compatible server accepts."""
    if all(p["type"] == "text" and len(p) == 2 for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _encode_part(part: Part, same_format: bool) -> dict[str, Any]:
    if isinstance(part, TextPart):
        text: dict[str, Any] = dict(part.extra) if same_format else {}
        text.update(type="text", text=part.text)
        return text
    if isinstance(part, ImagePart):
        url = part.url or f"data:{part.media_type};base64,{part.data}"
        image: dict[str, Any] = dict(part.extra) if same_format else {}
        image["url"] = url
        return {"type": "image_url", "image_url": image}
    raise ValueError(f"cannot encode {type(part).__name__} as message content")


def _encode_tool(tool: Tool, same_format: bool) -> dict[str, Any]:
    function: dict[str, Any] = dict(tool.extra) if same_format else {}
    function["name"] = tool.name
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


# --- provider response -> canonical ------------------------------------------------------


class _WireUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WireChoiceMessage(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    refusal: str | None = None


class _WireChoice(msgspec.Struct):
    message: _WireChoiceMessage
    finish_reason: str | None = None


class _WireResponse(msgspec.Struct):
    choices: list[_WireChoice]
    id: str = ""
    model: str = ""
    usage: _WireUsage | None = None


_RESPONSE_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage"})


def decode_response(body: bytes) -> Response:
    try:
        raw = msgspec.json.decode(body)
        wire = msgspec.convert(raw, _WireResponse)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise UpstreamError(502, f"Provider sent an invalid response: {exc}") from None
    if not wire.choices:
        raise UpstreamError(502, "Provider sent a response without choices")
    choice = wire.choices[0]
    content: list[TextPart | ToolCallPart] = []
    text = choice.message.content or choice.message.refusal
    if text:
        content.append(TextPart(text=text))
    for call in choice.message.tool_calls or ():
        arguments = call.function.arguments
        if not isinstance(arguments, str):
            arguments = _encode(arguments).decode()
        content.append(ToolCallPart(id=call.id, name=call.function.name, arguments=arguments))
    usage = wire.usage or _WireUsage()
    return Response(
        id=wire.id,
        model=wire.model,
        content=content,
        finish_reason=_FINISH_IN.get(choice.finish_reason, "stop"),
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        extra=known_extra(raw, _RESPONSE_FIELDS),
    )


# --- canonical -> client response -------------------------------------------------------


def _response_id(response_id: str) -> str:
    return response_id if response_id.startswith("chatcmpl") else f"chatcmpl-{response_id}"


def encode_response(response: Response, *, same_format: bool) -> bytes:
    text = response.text
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    calls = response.tool_calls
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    body: dict[str, Any] = dict(response.extra) if same_format else {}
    body.update(
        id=_response_id(response.id),
        object="chat.completion",
        created=int(time.time()),
        model=response.model,
        choices=[{"index": 0, "message": message, "finish_reason": response.finish_reason,
                  "logprobs": None}],
        usage=_usage(response.usage),
    )
    return _encode(body)


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


def encode_error(error: ProxyError) -> bytes:
    return _encode({"error": {
        "message": error.message,
        "type": error_type(error.status),
        "param": None,
        "code": error.code,
    }})


# --- streaming --------------------------------------------------------------------------


class _DeltaFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _DeltaToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _DeltaFunction | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_DeltaToolCall] | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _ChunkUsage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0


class _Chunk(msgspec.Struct):
    id: str = ""
    model: str = ""
    choices: list[_ChunkChoice] | None = None
    usage: _ChunkUsage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class StreamDecoder:
    """Turns a provider's ``data:`` payloads into canonical stream events."""

    def __init__(self, request: Request | None = None, same_format: bool = False) -> None:
        self.started = False
        self.ended = False
        self.next_index = 0
        self.text_index: int | None = None
        self.tool_index: dict[int, int] = {}  # OpenAI tool_calls[].index -> block index
        self.finish: FinishReason = "stop"
        self.finish_seen = False
        self.usage = Usage()

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        if data.strip() == b"[DONE]":
            return self.finish_events()
        try:
            chunk = _decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise UpstreamError(502, f"Provider sent a malformed stream chunk: {exc}") from None
        if chunk.error is not None:
            error = chunk.error
            message = error.get("message", error) if isinstance(error, dict) else error
            raise UpstreamError(502, f"Provider error mid-stream: {message}")
        out: list[StreamEvent] = []
        if not self.started:
            self.started = True
            out.append(StreamStart(id=chunk.id, model=chunk.model))
        if chunk.usage is not None:
            self.usage = Usage(input_tokens=chunk.usage.prompt_tokens or 0,
                               output_tokens=chunk.usage.completion_tokens or 0)
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is not None:
                text = delta.content or delta.refusal
                if text:
                    if self.text_index is None or self.text_index != self.next_index - 1:
                        self.text_index = self.next_index
                        self.next_index += 1
                    out.append(TextDelta(index=self.text_index, text=text))
                for call in delta.tool_calls or ():
                    function = call.function or _DeltaFunction()
                    if call.index not in self.tool_index:
                        self.tool_index[call.index] = self.next_index
                        self.next_index += 1
                        out.append(ToolCallStart(index=self.tool_index[call.index],
                                                 id=call.id or "", name=function.name or ""))
                    if function.arguments:
                        out.append(ToolCallDelta(index=self.tool_index[call.index],
                                                 arguments=function.arguments))
            if choice.finish_reason:
                self.finish = _FINISH_IN.get(choice.finish_reason, "stop")
                self.finish_seen = True
        return out

    def finish_events(self) -> list[StreamEvent]:
        if self.ended:
            return []
        self.ended = True
        return [StreamEnd(finish_reason=self.finish, usage=self.usage)]

    def close(self) -> list[StreamEvent]:
        """The provider closed the stream; some servers end without ``[DONE]``."""
        if self.ended or self.finish_seen:
            return self.finish_events()
        raise UpstreamError(502, "Provider stream ended before the answer was complete")


class StreamEncoder:
    """Turns canonical stream events into the client's ``data:`` chunks."""

    media_type = "text/event-stream"

    def __init__(self, request: Request) -> None:
        self.include_usage = request.stream_usage
        self.id = "chatcmpl-"
        self.model = request.model
        self.created = int(time.time())
        self.tool_index: dict[int, int] = {}  # block index -> OpenAI tool_calls[].index
        self._prefix()

    def _prefix(self) -> None:
        # Text deltas are most of a stream: their chunk is a template around the text.
        self.text_prefix = (b'data: {"id":' + _encode(self.id)
                            + b',"object":"chat.completion.chunk","created":'
                            + str(self.created).encode() + b',"model":' + _encode(self.model)
                            + b',"choices":[{"index":0,"delta":{"content":')
        self.text_suffix = b'},"finish_reason":null}]}\n\n'

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + _encode(chunk) + b"\n\n"

    def encode(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):
            return self.text_prefix + _encode(event.text) + self.text_suffix
        if isinstance(event, ToolCallDelta):
            position = self.tool_index.get(event.index, 0)
            return self._chunk({"tool_calls": [
                {"index": position, "function": {"arguments": event.arguments}}
            ]})
        if isinstance(event, ToolCallStart):
            position = self.tool_index[event.index] = len(self.tool_index)
            return self._chunk({"tool_calls": [{
                "index": position, "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }]})
        if isinstance(event, StreamStart):
            self.id = _response_id(event.id)
            self.model = event.model or self.model
            self._prefix()
            return self._chunk({"role": "assistant", "content": ""})
        out = self._chunk({}, event.finish_reason)
        if self.include_usage:
            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [], "usage": _usage(event.usage)}
            out += b"data: " + _encode(usage) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def encode_error(self, error: ProxyError) -> bytes:
        return b"data: " + encode_error(error) + b"\n\n"
