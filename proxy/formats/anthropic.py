"""Anthropic Messages wire format, both ways.

Client side: ``decode_request`` and ``encode_response`` / ``StreamEncoder``.
Provider side: ``encode_request`` and ``decode_response`` / ``StreamDecoder``.

Lossless: a block, field or event the canonical model does not know is kept as it came
(``OpaquePart``, ``extra``, ``WireEvent``) and written back to this format unchanged; a
message no plugin changed goes back as the very JSON it came as.
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy.canonical import (
    BlockDelta,
    BlockStart,
    BlockStop,
    DocumentPart,
    FinishReason,
    ImagePart,
    Message,
    OpaquePart,
    Part,
    RedactedThinkingPart,
    Request,
    Response,
    SignatureDelta,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    Tool,
    ToolCallDelta,
    ToolCallPart,
    ToolCallStart,
    ToolChoice,
    ToolResultPart,
    Usage,
    WireEvent,
    remember_wire,
    unchanged,
    wire_of,
)
from proxy.errors import BadRequest, ProxyError, Untranslatable, UpstreamError, error_type
from proxy.formats import common
from proxy.formats.common import known_extra

NAME = "anthropic"
DEFAULT_MAX_TOKENS = 4096
_encode = msgspec.json.Encoder().encode
# JSON output has no request field in this API: a client that asked for JSON is told so.
JSON_INSTRUCTION = "Respond with a single valid JSON value and nothing else."
# OpenAI's reasoning_effort as a thinking budget, and back.
EFFORT_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


# The roles the canonical model has a name for; a message of any other role is kept as
# it came (``common.unmodeled_role``).
_ROLES = frozenset({"user", "assistant", "system"})


class _Message(msgspec.Struct):
    role: str
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
_TEXT_FIELDS = frozenset({"type", "text"})
_TOOL_USE_FIELDS = frozenset({"type", "id", "name", "input"})
_TOOL_RESULT_FIELDS = frozenset({"type", "tool_use_id", "content", "is_error"})
_TOOL_CHOICE_FIELDS = frozenset({"type", "name", "disable_parallel_tool_use"})
# Fields of the other format's requests that may be left out here: each is a default, a
# hint with no effect on the answer, or modeled already. Anything else is refused.
_OPENAI_DROPPABLE: dict[str, tuple[Any, ...] | None] = {
    "n": (1,), "logprobs": (False,), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "store": None, "metadata": None, "service_tier": None,
    "stream_options": None, "parallel_tool_calls": None, "prompt_cache_key": None,
    "safety_identifier": None, "reasoning_effort": None, "modalities": (["text"],),
    "max_completion_tokens": None,
}

# Fields of the other format's messages that may go: the annotations of an earlier answer,
# and reasoning that OpenAI-compatible servers send, which this API cannot take back
# without its signature (and ignores in earlier turns anyway).
_OPENAI_MESSAGE_DROPPABLE = frozenset({"refusal", "annotations", "reasoning_content", "role"})

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


def _stop_reason(finish: str, stop_sequence: str | None, wire: object = None) -> str:
    """The stop reason for ``finish``: the provider's own word when it still says that."""
    if isinstance(wire, str) and _FINISH_IN.get(wire) == finish:
        return wire
    return "stop_sequence" if stop_sequence else _FINISH_OUT.get(finish, "end_turn")


# --- client request -> canonical --------------------------------------------------------


def decode_request(body: bytes) -> Request:
    return common.decode_request(body, _DOCUMENTED, _request, _add_messages)


def _add_messages(request: Request, raws: list[msgspec.Raw]) -> None:
    request.messages = []
    for message, raw, printed in common.messages_by_content(NAME, raws, _checked_message):
        remember_wire(message, raw, printed)
        request.messages.append(message)


def _checked_message(raw: dict[str, Any], index: int) -> Message:
    msgspec.convert(raw, _Message)  # what _MessagesRequest checks of each message
    return _decode_message(raw, index)


# Every top-level field of the API's reference (and hookproxy's own): a body with none
# other is split in one pass (``common.split_body``).
_DOCUMENTED = frozenset({
    "messages", "model", "max_tokens", "container", "context_management", "mcp_servers",
    "metadata", "output_config", "output_format", "service_tier", "stop_sequences", "stream",
    "system", "temperature", "thinking", "tool_choice", "tools", "top_k", "top_p",
    "hookproxy"})

# Where a request's size is: what peek_request leaves undecoded.
_DEFERRED = frozenset({"messages", "tools", "system"})


def peek_request(body: bytes) -> tuple[Request, int] | None:
    """The request without its messages, tools or system decoded, and its message count; see
    ``common.peek_request``."""
    return common.peek_request(body, _DEFERRED, _request, _DOCUMENTED)


def preview_request(peeked: Request, keep_newest: int) -> tuple[Request, int] | None:
    """What a record shows of a request ``peek_request`` read; see
    ``common.preview_request``."""
    return common.preview_request(peeked, keep_newest, _DEFERRED, decode_request,
                                  _add_messages)


def _request(raw: dict[str, Any]) -> Request:
    try:
        wire = msgspec.convert(raw, _MessagesRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from None
    if wire.max_tokens is None:
        raise BadRequest("Invalid request: Object missing required field `max_tokens`")
    messages = [_decode_message(raw_m, i) for i, raw_m in enumerate(raw["messages"])]
    system: list[TextPart] = []
    for j, part in enumerate(_blocks(wire.system, "system")):
        if not isinstance(part, TextPart):
            raise BadRequest(f"Invalid request: `$.system[{j}]` must be a text block")
        system.append(part)
    user = (wire.metadata or {}).get("user_id")
    choice, parallel = _decode_tool_choice(wire.tool_choice)
    request = Request(
        model=wire.model,
        messages=messages,
        system=system,
        tools=[_decode_tool(t, i) for i, t in enumerate(wire.tools or ())],
        tool_choice=choice,
        parallel_tool_calls=parallel,
        max_tokens=wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=list(wire.stop_sequences or ()),
        stream=bool(wire.stream),
        stream_usage=True,
        user=user if isinstance(user, str) else None,
        extra=known_extra(raw, _REQUEST_FIELDS),
    )
    remember_wire(request, raw)
    return request


def _decode_message(raw: dict[str, Any], index: int) -> Message:
    role = raw["role"]
    extra = known_extra(raw, _MESSAGE_FIELDS)
    if role not in _ROLES:
        # A role added since: read as a user turn, its role kept to go back as it came.
        role, extra = "user", {**extra, "role": role}
    message = Message(role=role, content=_blocks(raw["content"], f"messages[{index}]"
                                                                 ".content"),
                      extra=extra)
    remember_wire(message, raw)
    return message


def _blocks(content: str | list[dict[str, Any]] | None, where: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(text=content)]
    if not isinstance(content, list):
        raise BadRequest(f"Invalid request: Expected `str | array` at `$.{where}`")
    return [_block(block, f"{where}[{j}]") for j, block in enumerate(content)]


def _require(block: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = block.get(key)
    if not isinstance(value, kind):
        name = kind.__name__
        raise BadRequest(f"Invalid request: Expected `{name}` at `$.{where}.{key}`")
    return value


def _opaque(block: dict[str, Any]) -> OpaquePart:
    return OpaquePart(format=NAME, kind=str(block.get("type")), data=block)


def _block(block: dict[str, Any], where: str) -> Part:
    if not isinstance(block, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.{where}`")
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if type(text) is str and len(block) == 2:  # most blocks: nothing else to keep
            return TextPart(text=text)
        text = _require(block, "text", str, where)
        return TextPart(text=text, extra=known_extra(block, _TEXT_FIELDS))
    if kind == "image" or kind == "document":
        source = _require(block, "source", dict, where)
        kept = {"type", "source", "title"} if kind == "document" else {"type", "source"}
        extra = known_extra(block, kept)
        source_type = source.get("type")
        if set(source) - {"type", "url", "media_type", "data"}:
            return _opaque(block)
        if source_type == "url":
            url = _require(source, "url", str, f"{where}.source")
            if kind == "image":
                return ImagePart(url=url, extra=extra)
            return DocumentPart(url=url, name=_title(block, where), extra=extra)
        if source_type == "base64" or (kind == "document" and source_type == "text"):
            media_type = _require(source, "media_type", str, f"{where}.source")
            data = _require(source, "data", str, f"{where}.source")
            if kind == "image":
                return ImagePart(media_type=media_type, data=data, extra=extra)
            if source_type == "text":
                return DocumentPart(text=data, media_type=media_type,
                                    name=_title(block, where), extra=extra)
            return DocumentPart(media_type=media_type, data=data, name=_title(block, where),
                                extra=extra)
        return _opaque(block)  # a file id, custom content...
    if kind == "tool_use":
        arguments = block.get("input")
        if not isinstance(arguments, dict):
            arguments = {} if arguments is None else arguments
        return ToolCallPart(
            id=_require(block, "id", str, where),
            name=_require(block, "name", str, where),
            arguments=_encode(arguments).decode(),
            extra=known_extra(block, _TOOL_USE_FIELDS),
        )
    if kind == "tool_result":
        content = block.get("content")
        parts = _blocks(content, f"{where}.content") if content is not None else []
        results: list[TextPart | ImagePart | DocumentPart | OpaquePart] = []
        for part in parts:
            if isinstance(part, TextPart | ImagePart | DocumentPart | OpaquePart):
                results.append(part)
            else:
                raise BadRequest(f"Invalid request: a tool result at `$.{where}` cannot hold "
                                 f"a {type(part).__name__}")
        return ToolResultPart(
            tool_call_id=_require(block, "tool_use_id", str, where),
            content=results,
            is_error=bool(block.get("is_error")),
            extra=known_extra(block, _TOOL_RESULT_FIELDS),
        )
    if kind == "thinking":
        return ThinkingPart(thinking=_require(block, "thinking", str, where),
                            signature=block.get("signature") or "",
                            extra=known_extra(block, {"type", "thinking", "signature"}))
    if kind == "redacted_thinking":
        return RedactedThinkingPart(data=_require(block, "data", str, where),
                                    extra=known_extra(block, {"type", "data"}))
    if not isinstance(kind, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.type`")
    # server_tool_use, web_search_tool_result, search_result, container_upload...
    return _opaque(block)


def _title(block: dict[str, Any], where: str) -> str:
    title = block.get("title")
    if title is not None and not isinstance(title, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.title`")
    return title or ""


def _decode_tool(tool: dict[str, Any], index: int) -> Tool:
    if not isinstance(tool, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.tools[{index}]`")
    name = _require(tool, "name", str, f"tools[{index}]")
    kind = tool.get("type")
    if kind is not None and kind != "custom":
        # A server tool (web search, code execution, text editor...): its settings as sent.
        return Tool(name=name, type=str(kind), format=NAME,
                    extra=known_extra(tool, {"name", "type"}))
    return Tool(
        name=name,
        description=tool.get("description") or "",
        parameters=tool.get("input_schema") or {},
        extra=known_extra(tool, _TOOL_FIELDS),
    )


def _decode_tool_choice(choice: dict[str, Any] | None) -> tuple[ToolChoice | None, bool | None]:
    if choice is None:
        return None, None
    kind = choice.get("type")
    if not isinstance(kind, str):
        raise BadRequest("Invalid request: Expected `str` at `$.tool_choice.type`")
    disable = choice.get("disable_parallel_tool_use")
    parallel = None if disable is None else not disable
    extra = known_extra(choice, _TOOL_CHOICE_FIELDS)
    if kind == "tool":
        return ToolChoice(mode="tool", name=_require(choice, "name", str, "tool_choice"),
                          extra=extra), parallel
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in modes:
        raise BadRequest(f"Invalid request: unknown tool_choice type {kind!r}")
    return ToolChoice(mode=modes[kind], extra=extra), parallel  # type: ignore[arg-type]


# --- canonical -> provider request ------------------------------------------------------


def encode_request(
    request: Request, model: str, *, same_format: bool, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> bytes:
    max_tokens = request.max_tokens or default_max_tokens
    if same_format:
        body: dict[str, Any] = dict(request.extra)
    else:
        body = _from_openai(request, max_tokens)
    body["model"] = model
    body["max_tokens"] = max_tokens
    wire: dict[str, Any] | None = wire_of(request) if same_format else None
    if wire is not None and "system" in wire and _blocks(wire["system"], "system") == \
            request.system:
        body["system"] = wire["system"]
    else:
        system = [_encode_part(p, same_format) for p in request.system]
        if request.response_format and request.response_format.get("type") != "text":
            system.append({"type": "text", "text": JSON_INSTRUCTION})
        if system:
            simple = all(len(block) == 2 for block in system)
            body["system"] = "\n\n".join(b["text"] for b in system) if simple else system
    body["messages"] = _encode_messages(request.messages, same_format)
    if request.tools:
        body["tools"] = [_encode_tool(t, same_format) for t in request.tools]
    choice = request.tool_choice
    if choice is not None or (request.parallel_tool_calls is False and request.tools):
        choice = choice or ToolChoice()
        kinds = {"auto": "auto", "required": "any", "none": "none", "tool": "tool"}
        wire_choice: dict[str, Any] = dict(choice.extra) if same_format else {}
        wire_choice["type"] = kinds[choice.mode]
        if choice.mode == "tool":
            wire_choice["name"] = choice.name
        if request.parallel_tool_calls is not None and choice.mode != "none":
            wire_choice["disable_parallel_tool_use"] = not request.parallel_tool_calls
        body["tool_choice"] = wire_choice
    if request.temperature is not None:
        # OpenAI allows up to 2; this API up to 1.
        body["temperature"] = (request.temperature if same_format
                               else min(request.temperature, 1.0))
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = request.stop
    if request.user:
        # The user may have changed (a plugin masked it): metadata says it as it is now.
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            body["metadata"] = {"user_id": request.user}
        elif metadata.get("user_id") != request.user:
            body["metadata"] = {**metadata, "user_id": request.user}
    if request.stream:
        body["stream"] = True
    return _encode(body)


def stream_body(request: Request, raw_body: bytes) -> bytes:
    """What goes to a provider of this format for a streaming request nothing changed:
    the client's body as it came."""
    return raw_body


def _from_openai(request: Request, max_tokens: int) -> dict[str, Any]:
    """The top-level fields of an OpenAI request that this API has a form for; the others
    are defaults or hints that may go (``_OPENAI_DROPPABLE``), or a 400 names them."""
    body: dict[str, Any] = {}
    for key, value in request.extra.items():
        if value is None:
            continue
        if key in _OPENAI_DROPPABLE:
            allowed = _OPENAI_DROPPABLE[key]
            if allowed is None or value in allowed:
                continue
        raise Untranslatable(f"Field `{key}` = {_shown(value)}", NAME)
    effort = request.extra.get("reasoning_effort")
    if isinstance(effort, str) and effort in EFFORT_BUDGET:
        budget = min(EFFORT_BUDGET[effort], max_tokens - 1)
        if budget >= 1024:  # the least this API takes
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return body


def _shown(value: object) -> str:
    text = _encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _encode_messages(messages: list[Message], same_format: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        original = wire_of(message) if same_format else None
        if original is not None and unchanged(message):
            out.append(original)  # unchanged: as it came (JSON text, or decoded)
            continue
        if isinstance(original, msgspec.Raw):
            original = common.decode_raw(original)
        role = common.unmodeled_role(message)
        if not same_format and role is not None:
            raise Untranslatable(f"Message role {role!r}", NAME)
        blocks = _encode_content(message.content, same_format,
                                 original.get("content") if original else None)
        if not same_format and out and out[-1]["role"] == message.role != "system" \
                and isinstance(out[-1]["content"], list) and isinstance(blocks, list):
            # From the other format, turns of one role in a row become one turn.
            out[-1]["content"].extend(blocks)
            continue
        if same_format:
            wire: dict[str, Any] = dict(message.extra)
        else:
            wire = {}
            for key, value in message.extra.items():
                if value is not None and key not in _OPENAI_MESSAGE_DROPPABLE:
                    raise Untranslatable(f"Field `{key}` of a message", NAME)
        wire["role"] = role or message.role
        wire["content"] = blocks
        out.append(wire)
    return out


def _encode_content(parts: list[Part], same_format: bool, original: object
                    ) -> str | list[dict[str, Any]]:
    """Blocks for ``parts``; where the client sent a string, a string again if it still is
    plain text, and each block no one changed as it came."""
    if isinstance(original, str) and len(parts) == 1 and isinstance(parts[0], TextPart) \
            and not parts[0].extra:
        return parts[0].text
    originals = original if isinstance(original, list) else ()
    out = []
    for j, part in enumerate(parts):
        block = originals[j] if j < len(originals) else None
        if isinstance(block, dict) and _same_block(block, part):
            out.append(block)
        else:
            out.append(_encode_part(part, same_format, block))
    return out


def _same_block(block: dict[str, Any], part: Part) -> bool:
    try:
        return _block(block, "") == part
    except BadRequest:
        return False


def _encode_part(part: Part, same_format: bool, original: object = None) -> dict[str, Any]:
    if isinstance(part, OpaquePart):
        if part.format != NAME:
            raise Untranslatable(f"Content part type {part.kind!r}", NAME)
        return part.data
    block: dict[str, Any] = dict(part.extra) if same_format else {}
    if isinstance(part, TextPart):
        block.update(type="text", text=part.text)
    elif isinstance(part, ImagePart):
        source = (
            {"type": "url", "url": part.url} if part.url
            else {"type": "base64", "media_type": part.media_type, "data": part.data}
        )
        block.update(type="image", source=source)
    elif isinstance(part, DocumentPart):
        if part.url:
            source = {"type": "url", "url": part.url}
        elif part.data:
            source = {"type": "base64", "media_type": part.media_type, "data": part.data}
        else:
            source = {"type": "text", "media_type": part.media_type or "text/plain",
                      "data": part.text}
        block.update(type="document", source=source)
        if part.name:
            block["title"] = part.name
    elif isinstance(part, ToolCallPart):
        block.update(type="tool_use", id=part.id, name=part.name,
                     input=_arguments(part.arguments, part.name))
    elif isinstance(part, ThinkingPart):
        block.update(type="thinking", thinking=part.thinking, signature=part.signature)
    elif isinstance(part, RedactedThinkingPart):
        block.update(type="redacted_thinking", data=part.data)
    else:
        inner = original.get("content") if isinstance(original, dict) else None
        block.update(type="tool_result", tool_use_id=part.tool_call_id,
                     content=_encode_content(list(part.content), same_format, inner))
        if part.is_error:
            block["is_error"] = True
    return block


def _arguments(arguments: str, name: str = "") -> dict[str, Any]:
    try:
        value = msgspec.json.decode(arguments or "{}")
    except (msgspec.DecodeError, RecursionError):  # nested past what msgspec reads
        value = None
    if not isinstance(value, dict):
        raise Untranslatable(f"The arguments of tool call {name!r} (not a JSON object: "
                             f"{arguments[:60]!r})", NAME)
    return value


def _encode_tool(tool: Tool, same_format: bool) -> dict[str, Any]:
    if tool.type:
        if tool.format != NAME:
            raise Untranslatable(f"Tool {tool.name!r} of type {tool.type!r}", NAME)
        return {"name": tool.name, "type": tool.type, **tool.extra}
    if same_format:
        wire: dict[str, Any] = dict(tool.extra)
    else:
        wire = {}
        for key, value in tool.extra.items():
            if key != "strict":  # the one function field both APIs have
                raise Untranslatable(f"Field `{key}` of tool {tool.name!r}", NAME)
            wire[key] = value
    wire["name"] = tool.name
    if tool.description:
        wire["description"] = tool.description
    wire["input_schema"] = tool.parameters or {"type": "object", "properties": {}}
    return wire


# --- provider response -> canonical ------------------------------------------------------


class _WireResponse(msgspec.Struct):
    content: list[dict[str, Any]]
    id: str = ""
    model: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] | None = None


_RESPONSE_FIELDS = frozenset(
    {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
)
_USAGE_FIELDS = frozenset({"input_tokens", "output_tokens", "cache_creation_input_tokens",
                           "cache_read_input_tokens"})


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and value > 0 else 0


def decode_usage(usage: dict[str, Any] | None) -> Usage:
    """This API's usage: ``input_tokens`` there leaves out the cached tokens, which the
    canonical count includes."""
    if not usage:
        return Usage()
    read = _count(usage, "cache_read_input_tokens")
    write = _count(usage, "cache_creation_input_tokens")
    return Usage(input_tokens=_count(usage, "input_tokens") + read + write,
                 output_tokens=_count(usage, "output_tokens"),
                 cache_read_tokens=read, cache_write_tokens=write,
                 extra=known_extra(usage, _USAGE_FIELDS))


def encode_usage(usage: Usage, same_format: bool) -> dict[str, Any]:
    wire: dict[str, Any] = dict(usage.extra) if same_format else {}
    wire.update(
        input_tokens=max(usage.input_tokens - usage.cache_read_tokens
                         - usage.cache_write_tokens, 0),
        cache_creation_input_tokens=usage.cache_write_tokens,
        cache_read_input_tokens=usage.cache_read_tokens,
        output_tokens=usage.output_tokens,
    )
    return wire


def decode_response(body: bytes) -> Response:
    try:
        raw = msgspec.json.decode(body)
        wire = msgspec.convert(raw, _WireResponse)
        content = [_block(block, f"content[{j}]") for j, block in enumerate(wire.content)]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, BadRequest) as exc:
        message = exc.message if isinstance(exc, BadRequest) else str(exc)
        raise UpstreamError(502, f"Provider sent an invalid response: {message}") from None
    choice_extra = {"stop_reason": wire.stop_reason} if wire.stop_reason else {}
    return Response(
        id=wire.id,
        model=wire.model,
        content=content,
        finish_reason=_FINISH_IN.get(wire.stop_reason, "stop"),
        usage=decode_usage(wire.usage),
        stop_sequence=wire.stop_sequence,
        extra=known_extra(raw, _RESPONSE_FIELDS),
        choice_extra=choice_extra,
    )


# --- canonical -> client response -------------------------------------------------------


def _message_id(response_id: str) -> str:
    return response_id if response_id.startswith("msg") else f"msg_{response_id}"


def encode_response(response: Response, *, same_format: bool) -> bytes:
    content: list[dict[str, Any]] = []
    for part in response.content:
        if isinstance(part, OpaquePart) and part.format != NAME:
            continue  # another API's server-tool block: this client has no use for it
        if isinstance(part, ToolResultPart):
            continue
        if isinstance(part, ToolCallPart):
            content.append({**(part.extra if same_format else {}), "type": "tool_use",
                            "id": part.id, "name": part.name,
                            "input": _answer_arguments(part.arguments)})
        else:
            content.append(_encode_part(part, same_format))
    body: dict[str, Any] = dict(response.extra) if same_format else {}
    body.update(
        id=_message_id(response.id),
        type="message",
        role="assistant",
        model=response.model,
        content=content,
        stop_reason=_stop_reason(response.finish_reason, response.stop_sequence,
                                 response.choice_extra.get("stop_reason")),
        stop_sequence=response.stop_sequence,
        usage=encode_usage(response.usage, same_format),
    )
    return _encode(body)


def _answer_arguments(arguments: str) -> Any:
    """A model's tool arguments as this API's ``input``: a model may have cut them short,
    and the client still gets what there is, as text, rather than an error."""
    try:
        return msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {"_arguments": arguments}


def encode_error(error: ProxyError) -> bytes:
    return _encode({"type": "error",
                    "error": {"type": error_type(error.status), "message": error.message}})


# --- streaming --------------------------------------------------------------------------


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


class StreamDecoder:
    """Turns a provider's SSE events into canonical stream events. Block indexes are the
    provider's. ``same_format``: each event keeps its bytes (``raw``) to pass on as is."""

    def __init__(self, request: Request | None = None, same_format: bool = False) -> None:
        self.keep_raw = same_format
        self.ended = False
        self.tool_blocks: set[int] = set()
        self.finish: FinishReason = "stop"
        self.stop_sequence: str | None = None
        self.usage = Usage()
        self.wire_usage: dict[str, Any] = {}
        self.pending = b""  # message_delta's bytes, which go out with message_stop

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        try:
            payload = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(502, f"Provider sent a malformed stream event: {exc}") from None
        if not isinstance(payload, dict):
            raise UpstreamError(502, "Provider sent a malformed stream event")
        kind = payload.get("type", event)
        raw = (b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
               if self.keep_raw else None)
        index = payload.get("index", 0)
        if not isinstance(index, int):
            raise UpstreamError(502, "Provider sent a stream event with an invalid index")
        if kind == "content_block_delta":
            delta = payload.get("delta") or {}
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                return [TextDelta(index=index, text=delta.get("text", ""), raw=raw)]
            if delta_type == "input_json_delta" and index in self.tool_blocks:
                return [ToolCallDelta(index=index, arguments=delta.get("partial_json", ""),
                                      raw=raw)]
            if delta_type == "thinking_delta":
                return [ThinkingDelta(index=index, thinking=delta.get("thinking", ""), raw=raw)]
            if delta_type == "signature_delta":
                return [SignatureDelta(index=index, signature=delta.get("signature", ""),
                                       raw=raw)]
            return [BlockDelta(index=index, format=NAME, delta=delta, raw=raw)]
        if kind == "content_block_start":
            block = payload.get("content_block") or {}
            block_type = block.get("type")
            if block_type == "text" and set(block) <= {"type", "text"}:
                return [TextDelta(index=index, text=block.get("text", ""), raw=raw)]
            if block_type == "tool_use":
                self.tool_blocks.add(index)
                return [ToolCallStart(index=index, id=block.get("id", ""),
                                      name=block.get("name", ""), raw=raw)]
            if block_type == "thinking":
                return [ThinkingDelta(index=index, thinking=block.get("thinking", ""), raw=raw)]
            # Redacted thinking, a server tool's call or result, text with citations...
            return [BlockStart(index=index, format=NAME, block=block, raw=raw)]
        if kind == "content_block_stop":
            return [BlockStop(index=index, raw=raw)]
        if kind == "message_start":
            message = payload.get("message") or {}
            usage = message.get("usage")
            self.wire_usage = dict(usage) if isinstance(usage, dict) else {}
            self.usage = decode_usage(self.wire_usage)
            return [StreamStart(id=message.get("id", ""), model=message.get("model", ""),
                                usage=self.usage, raw=raw)]
        if kind == "message_delta":
            delta = payload.get("delta") or {}
            self.finish = _FINISH_IN.get(delta.get("stop_reason"), "stop")
            self.stop_sequence = delta.get("stop_sequence")
            usage = payload.get("usage")
            if isinstance(usage, dict):
                # Its counts are cumulative: those it has replace those of message_start.
                self.wire_usage.update(usage)
                self.usage = decode_usage(self.wire_usage)
            self.pending += raw or b""
            return []
        if kind == "message_stop":
            return self.finish_events((self.pending + raw) if raw is not None else None)
        if kind == "error":
            error = payload.get("error") or {}
            raise UpstreamError(502, f"Provider error mid-stream: {error.get('message', error)}")
        # ping, and events added later: they reach a client of this format as they came.
        return [WireEvent(format=NAME, raw=raw)] if raw is not None else []

    def finish_events(self, raw: bytes | None = None) -> list[StreamEvent]:
        if self.ended:
            return []
        self.ended = True
        end = StreamEnd(finish_reason=self.finish, usage=self.usage,
                        stop_sequence=self.stop_sequence, raw=raw)
        return [end]

    def close(self) -> list[StreamEvent]:
        if not self.ended:
            raise UpstreamError(502, "Provider stream ended before the answer was complete")
        return []


class StreamEncoder:
    """Turns canonical stream events into the client's SSE events. An event that carries
    the provider's bytes (``raw``) goes out as them."""

    media_type = "text/event-stream"

    def __init__(self, request: Request) -> None:
        self.model = request.model
        self.open: int | None = None  # the block started and not yet stopped
        self.text_prefix = b""
        self.text_index: int | None = None

    def _start(self, index: int, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open = index
        return out + _sse("content_block_start", {
            "type": "content_block_start", "index": index, "content_block": block})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        index, self.open = self.open, None
        return _sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                            "delta": delta})

    def encode(self, event: StreamEvent) -> bytes:
        raw = event.raw
        if raw is not None:
            # The provider's own event: only the open block needs following.
            if isinstance(event, BlockStop):
                self.open = None
            elif isinstance(event, TextDelta | ThinkingDelta | ToolCallStart | BlockStart):
                self.open = event.index
            return raw
        if isinstance(event, TextDelta):
            if event.choice:
                return b""
            out = b""
            if self.open != event.index:
                out = self._start(event.index, {"type": "text", "text": ""})
                if not event.text:
                    return out
            if self.text_index != event.index:
                # Text deltas are most of a stream: their event is a template around the text.
                self.text_index = event.index
                self.text_prefix = (b'event: content_block_delta\ndata: {"type":'
                                    b'"content_block_delta","index":'
                                    + str(event.index).encode()
                                    + b',"delta":{"type":"text_delta","text":')
            return out + self.text_prefix + _encode(event.text) + b"}}\n\n"
        if isinstance(event, ThinkingDelta):
            out = b""
            if self.open != event.index:
                out = self._start(event.index, {"type": "thinking", "thinking": "",
                                                "signature": ""})
                if not event.thinking:
                    return out
            return out + self._delta(event.index, {"type": "thinking_delta",
                                                   "thinking": event.thinking})
        if isinstance(event, SignatureDelta):
            out = b""
            if self.open != event.index:
                out = self._start(event.index, {"type": "thinking", "thinking": "",
                                                "signature": ""})
            return out + self._delta(event.index, {"type": "signature_delta",
                                                   "signature": event.signature})
        if isinstance(event, ToolCallDelta):
            if event.choice:
                return b""
            return self._delta(event.index, {"type": "input_json_delta",
                                             "partial_json": event.arguments})
        if isinstance(event, ToolCallStart):
            if event.choice:
                return b""
            return self._start(event.index, {"type": "tool_use", "id": event.id,
                                             "name": event.name, "input": {}})
        if isinstance(event, BlockStart):
            if event.format not in (NAME, ""):
                return b""
            return self._start(event.index, event.block)
        if isinstance(event, BlockDelta):
            if event.format != NAME:
                return b""
            return self._delta(event.index, event.delta)
        if isinstance(event, BlockStop):
            return self._close() if self.open == event.index else b""
        if isinstance(event, WireEvent):
            return b""
        if isinstance(event, StreamStart):
            usage = encode_usage(event.usage, True)
            usage["output_tokens"] = event.usage.output_tokens
            return _sse("message_start", {"type": "message_start", "message": {
                "id": _message_id(event.id), "type": "message", "role": "assistant",
                "model": event.model or self.model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": usage,
            }})
        return self._close() + _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(event.finish_reason, event.stop_sequence),
                      "stop_sequence": event.stop_sequence},
            "usage": encode_usage(event.usage, True),
        }) + _sse("message_stop", {"type": "message_stop"})

    def encode_error(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + encode_error(error) + b"\n\n"
