"""OpenAI Chat Completions wire format, both ways.

Client side: ``decode_request`` and ``encode_response`` / ``StreamEncoder``.
Provider side: ``encode_request`` and ``decode_response`` / ``StreamDecoder``.

Lossless: a part, field or chunk the canonical model does not know is kept as it came
(``OpaquePart``, ``extra``, ``WireEvent``) and written back to this format unchanged; a
message no plugin changed goes back as the very JSON it came as.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from proxy.canonical import (
    DocumentPart,
    FinishReason,
    ImagePart,
    Message,
    OpaquePart,
    Part,
    RedactedThinkingPart,
    Request,
    Response,
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
    fingerprint,
    remember_wire,
    unchanged,
    wire_of,
)
from proxy.errors import BadRequest, ProxyError, Untranslatable, UpstreamError, error_type
from proxy.formats import common
from proxy.formats.common import known_extra, parse_data_url

NAME = "openai"
_encode = msgspec.json.Encoder().encode

# --- wire types, used to validate what arrives (unknown fields are kept separately) ---


# The roles the canonical model has a name for; a message of any other role is kept as
# it came (``common.unmodeled_role``).
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class _Message(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _ChatRequest(msgspec.Struct):
    model: str
    messages: list[_Message]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


# Kept in ``extra`` though read: max_completion_tokens (which key to write back) and
# stream_options (its other keys).
_REQUEST_FIELDS = frozenset(_ChatRequest.__struct_fields__) - {"max_completion_tokens",
                                                               "stream_options"}
_MESSAGE_FIELDS = frozenset(_Message.__struct_fields__) | {"role"}
_TOOL_FUNCTION_FIELDS = frozenset({"name", "description", "parameters"})
_TEXT_FIELDS = frozenset({"type", "text"})
_CALL_FIELDS = frozenset({"id", "type", "function"})
_FUNCTION_FIELDS = frozenset({"name", "arguments"})
# Fields of the other format's requests this API has no place for, which may go: hints
# with no effect on the answer, or instructions about what is left out here anyway.
_ANTHROPIC_DROPPABLE = frozenset({"metadata", "service_tier", "thinking", "output_config",
                                  "context_management"})
# Fields of the other format's blocks that may go: cache hints (this API caches by
# itself) and citations of earlier answers.
_DROPPABLE_BLOCK_FIELDS = frozenset({"cache_control", "citations"})

_FINISH_IN: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


# --- client request -> canonical --------------------------------------------------------


def decode_request(body: bytes) -> Request:
    return common.decode_request(body, _DOCUMENTED, _request, _add_messages)


def _add_messages(request: Request, raws: list[msgspec.Raw]) -> None:
    _remember_system(request, _set_messages(request, raws))


def _set_messages(request: Request, raws: list[msgspec.Raw]) -> int:
    """Decodes ``raws`` into the request's system prompt and messages; returns how many
    of them the system prompt came from. (A record's preview, never encoded, needs no
    more: ``_add_messages`` also remembers the system prompt for ``encode_request``.)"""
    request.system, request.messages, leading = _assemble(
        common.messages_by_content(NAME, raws, _checked_unit))
    return leading


# A decoded request's system prompt as it came: how many wire messages made it, and its
# fingerprint then. ``encode_request`` sends those messages as they came while the
# system prompt is unchanged, and knows when it is not without decoding them again.
_SYSTEM_AS_DECODED = "system_as_decoded"


def _remember_system(request: Request, leading: int) -> None:
    if leading:
        request.__dict__[_SYSTEM_AS_DECODED] = (leading, fingerprint(request.system))


# Every top-level field of the API's reference (and hookproxy's own): a body with none
# other is split in one pass (``common.split_body``).
_DOCUMENTED = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options", "hookproxy"})

# Where a request's size is: what peek_request leaves undecoded.
_DEFERRED = frozenset({"messages", "tools"})


def peek_request(body: bytes) -> tuple[Request, int] | None:
    """The request without its messages, tools decoded, and its message count; see
    ``common.peek_request``."""
    return common.peek_request(body, _DEFERRED, _request, _DOCUMENTED)


def preview_request(peeked: Request, keep_newest: int) -> tuple[Request, int] | None:
    """What a record shows of a request ``peek_request`` read; see
    ``common.preview_request``."""
    return common.preview_request(peeked, keep_newest, _DEFERRED, decode_request,
                                  _set_messages)


def _request(raw: dict[str, Any]) -> Request:
    try:
        wire = msgspec.convert(raw, _ChatRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from None
    system, messages, leading = _decode_messages(raw["messages"])
    extra = known_extra(raw, _REQUEST_FIELDS)
    choice = _decode_tool_choice(wire.tool_choice)
    if choice is None and wire.tool_choice is not None:
        extra["tool_choice"] = wire.tool_choice  # a shape not modeled: kept as it came
    stop = wire.stop
    request = Request(
        model=wire.model,
        messages=messages,
        system=system,
        tools=[_decode_tool(t, i) for i, t in enumerate(wire.tools or ())],
        tool_choice=choice,
        parallel_tool_calls=wire.parallel_tool_calls,
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
    remember_wire(request, raw)
    _remember_system(request, leading)
    return request


def _decode_messages(raws: list[dict[str, Any]]
                     ) -> tuple[list[TextPart], list[Message], int]:
    """The leading system/developer messages as the system prompt, and the messages;
    each message remembers the wire message(s) it came from. (As ``_assemble``.)"""
    return _assemble([(_unit(raw, i), raw, None) for i, raw in enumerate(raws)])


def _assemble(units: Sequence[tuple[Message, Any, bytes | None]]
              ) -> tuple[list[TextPart], list[Message], int]:
    """The system prompt and the messages from each wire message decoded on its own
    (``_unit``, with its wire JSON and maybe its fingerprint): the leading system/developer
    messages become the system prompt, and consecutive tool results one user turn. Also
    how many wire messages the system prompt came from."""
    system: list[TextPart] = []
    messages: list[Message] = []
    leading = True
    count = 0
    after_result = False  # whether the last message is tool results
    merged: dict[int, Message] = {}
    for i, (message, raw, printed) in enumerate(units):
        if message.role == "system" and leading:
            developer = message.extra.get("role") == "developer"
            for part in message.content:
                if not isinstance(part, TextPart):
                    raise BadRequest(f"Invalid request: `$.messages[{i}]` "
                                     f"({'developer' if developer else 'system'}) may only "
                                     "hold text")
                system.append(TextPart(text=part.text, extra={
                    **part.extra, **({"role": "developer"} if developer else {})}))
            count = i + 1
            continue
        leading = False
        result = _is_tool_result(message)
        if result and after_result:
            # Consecutive tool results answer one assistant turn: keep them in one message.
            last = messages[-1]
            last.content.extend(message.content)
            wire_of(last).append(raw)
            merged[id(last)] = last
            continue
        remember_wire(message, [raw], printed)
        messages.append(message)
        after_result = result
    for message in merged.values():
        remember_wire(message, wire_of(message))  # its fingerprint as merged
    return system, messages, count


def _is_tool_result(message: Message) -> bool:
    return message.role == "user" and bool(message.content) and all(
        isinstance(part, ToolResultPart) for part in message.content)


def _checked_unit(raw: dict[str, Any], index: int) -> Message:
    msgspec.convert(raw, _Message)  # what _ChatRequest checks of each message
    return _unit(raw, index)


def _unit(raw: dict[str, Any], i: int) -> Message:
    """One wire message as a message of its own: a system or developer message as a system
    message (``extra.role`` says which), a tool message as a user turn of one result."""
    role = raw["role"]
    if role not in _ROLES:
        # The legacy ``function`` role, or one added since: read as a user turn (what
        # it holds is text the provider reads, which content checks must see too),
        # its role and everything else kept to go back as it came.
        return Message(role="user", content=_content_parts(raw.get("content"), i),
                       name=raw.get("name"), extra={
                           **known_extra(raw, {"role", "content", "name"}), "role": role})
    extra = known_extra(raw, _MESSAGE_FIELDS)
    if role == "tool":
        result = ToolResultPart(tool_call_id=raw.get("tool_call_id") or "", extra=extra)
        for part in _content_parts(raw.get("content"), i):
            if not isinstance(part, TextPart | ImagePart | DocumentPart | OpaquePart):
                raise BadRequest(f"Invalid request: `$.messages[{i}]` (tool) may not "
                                 f"hold a {type(part).__name__}")
            result.content.append(part)
        return Message(role="user", content=[result])
    parts = _content_parts(raw.get("content"), i)
    for j, call in enumerate(raw.get("tool_calls") or ()):
        parts.append(_decode_tool_call(call, f"messages[{i}].tool_calls[{j}]"))
    if role in ("system", "developer"):
        if role == "developer":
            extra = {**extra, "role": "developer"}
        return Message(role="system", content=parts, name=raw.get("name"), extra=extra)
    return Message(role="assistant" if role == "assistant" else "user",
                   content=parts, name=raw.get("name"), extra=extra)


def _decode_tool_call(call: object, where: str) -> ToolCallPart:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict) \
            or not isinstance(call.get("id"), str) or not isinstance(function.get("name"), str):
        raise BadRequest(f"Invalid request: `$.{where}` must have an `id` and a "
                         "`function` with a `name`")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = _encode(arguments).decode()
    extra = known_extra(call, _CALL_FIELDS)
    function_extra = known_extra(function, _FUNCTION_FIELDS)
    if function_extra:
        extra["function"] = function_extra
    return ToolCallPart(id=call["id"], name=function["name"], arguments=arguments, extra=extra)


def _content_parts(content: object, index: int) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(text=content)]
    if not isinstance(content, list):
        raise BadRequest(f"Invalid request: Expected `str | array` at "
                         f"`$.messages[{index}].content`")
    return [_part(part, f"messages[{index}].content[{j}]") for j, part in enumerate(content)]


def _part(part: object, where: str) -> Part:
    if not isinstance(part, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.{where}`")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.text`")
        return TextPart(text=text, extra=known_extra(part, _TEXT_FIELDS))
    if kind == "image_url" and len(part) == 2:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.image_url.url`")
        media_type, data = parse_data_url(url)
        extra = known_extra(image, {"url"}) if isinstance(image, dict) else {}
        return ImagePart(url="" if data else url, media_type=media_type, data=data,
                         extra=extra)
    if kind == "file" and len(part) == 2:
        file = part.get("file")
        data_url = file.get("file_data") if isinstance(file, dict) else None
        if isinstance(file, dict) and isinstance(data_url, str) \
                and set(file) <= {"file_data", "filename"}:
            media_type, data = parse_data_url(data_url)
            if data:
                name = file.get("filename")
                return DocumentPart(media_type=media_type, data=data,
                                    name=name if isinstance(name, str) else "")
    if not isinstance(kind, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.type`")
    # input_audio, a file by id, a refusal, a part type added last week.
    return OpaquePart(format=NAME, kind=kind, data=part)


def _decode_tool(tool: object, index: int) -> Tool:
    if not isinstance(tool, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.tools[{index}]`")
    kind = tool.get("type", "function")
    function = tool.get("function")
    if kind != "function":
        name = tool.get(kind, {}).get("name") if isinstance(tool.get(kind), dict) else None
        return Tool(name=name if isinstance(name, str) else str(kind), type=str(kind),
                    format=NAME, extra=known_extra(tool, {"type"}))
    if not isinstance(function, dict):
        raise BadRequest(f"Invalid request: `$.tools[{index}]` must have a `function`")
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
    """The tool choice, or None for a shape the model has no form for."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise BadRequest(f"Invalid request: unknown tool_choice {choice!r}")
        return ToolChoice(mode=choice)  # type: ignore[arg-type]
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type", "function") != "function" or set(choice) - {"type", "function"} \
            or not isinstance(function, dict) or not isinstance(name, str) \
            or len(function) != 1:
        return None
    return ToolChoice(mode="tool", name=name)


# --- canonical -> provider request ------------------------------------------------------


def encode_request(request: Request, model: str, *, same_format: bool) -> bytes:
    messages: list[dict[str, Any]] = []
    wire: dict[str, Any] | None = wire_of(request) if same_format else None
    as_decoded = request.__dict__.get(_SYSTEM_AS_DECODED)
    if wire is not None and as_decoded is not None and \
            fingerprint(request.system) == as_decoded[1]:
        messages.extend(wire["messages"][:as_decoded[0]])  # as they came
    else:
        for part in request.system:
            role = part.extra.get("role", "system")
            if same_format and len(part.extra) > (1 if "role" in part.extra else 0):
                extra = {k: v for k, v in part.extra.items() if k != "role"}
                messages.append({"role": role, "content": [{**extra, "type": "text",
                                                            "text": part.text}]})
            else:
                if part.extra:
                    _check_block_fields(part, "a system text block")
                messages.append({"role": role, "content": part.text})
    for message in request.messages:
        original = wire_of(message) if same_format else None
        if original is not None and unchanged(message):
            messages.extend(original)  # unchanged: as it came (JSON text, or decoded)
        else:
            messages.extend(_encode_message(message, same_format))
    body = dict(request.extra) if same_format else _from_anthropic(request)
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
    if request.parallel_tool_calls is not None and request.tools:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.max_tokens is not None:
        # A client that said max_completion_tokens keeps its word (newer OpenAI models
        # refuse max_tokens), and so does one that said max_tokens. A limit the proxy
        # supplied to a client of this API that named none (param_limits) goes under the
        # name the API has now; across formats, the key every compatible server knows.
        key = "max_completion_tokens" if "max_completion_tokens" in body or (
            wire is not None and "max_tokens" not in wire) else "max_tokens"
        body[key] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.user is not None:
        body["user"] = request.user
    if request.stream:
        body["stream"] = True
        # Always ask for usage: the log needs it; the client gets it only if it asked.
        body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    return _encode(body)


def stream_body(request: Request, raw_body: bytes) -> bytes:
    """What goes to a provider of this format for a streaming request nothing changed:
    the client's body as it came, asking for the usage chunk the log needs if the client
    did not (it goes to the client only if it asked)."""
    wire = wire_of(request)
    if request.stream_usage or wire is None:
        return raw_body
    body = dict(wire)
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return _encode(body)


def _from_anthropic(request: Request) -> dict[str, Any]:
    """The top-level fields of an Anthropic request that this API has a form for; the
    others are hints that may go (``_ANTHROPIC_DROPPABLE``), or a 400 names them."""
    body: dict[str, Any] = {}
    extra = request.extra
    for key, value in extra.items():
        if value is not None and key not in _ANTHROPIC_DROPPABLE:
            raise Untranslatable(f"Field `{key}`", NAME)
    edits = (extra.get("context_management") or {}).get("edits") or ()
    for edit in edits:
        # Clearing old thinking: thinking never goes to this API anyway.
        if not (isinstance(edit, dict) and str(edit.get("type", "")).startswith(
                "clear_thinking")):
            raise Untranslatable(f"Context management edit {_shown(edit)}", NAME)
    output = extra.get("output_config") or {}
    if set(output) - {"effort", "format"}:
        raise Untranslatable(f"Field `output_config` = {_shown(output)}", NAME)
    thinking = extra.get("thinking") or {}
    effort = output.get("effort")
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens") or 0
        effort = effort or ("low" if budget <= 4096 else "medium" if budget <= 16384
                            else "high")
    if thinking.get("type") in ("enabled", "adaptive") and effort in ("low", "medium",
                                                                      "high", "minimal"):
        body["reasoning_effort"] = effort
    schema = output.get("format")
    if isinstance(schema, dict) and schema.get("type") == "json_schema" and \
            request.response_format is None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": schema.get("schema") or {}}}
    return body


def _shown(value: object) -> str:
    text = _encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _check_block_fields(part: Any, what: str) -> None:
    """Fields of another format's block that would be lost here: a 400 names them."""
    for key in part.extra:
        if key not in _DROPPABLE_BLOCK_FIELDS and key != "role":
            raise Untranslatable(f"Field `{key}` of {what}", NAME)


def _encode_message(message: Message, same_format: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ToolResultPart):
            result: dict[str, Any] = dict(part.extra) if same_format else {}
            if not same_format:
                _check_block_fields(part, "a tool result")
            result.update(role="tool", tool_call_id=part.tool_call_id, content=_simple_content(
                [_encode_part(p, same_format) for p in part.content]))
            out.append(result)
        elif isinstance(part, ToolCallPart):
            call: dict[str, Any] = {}
            function: dict[str, Any] = {}
            if same_format:
                call.update({k: v for k, v in part.extra.items() if k != "function"})
                function.update(part.extra.get("function") or {})
            else:
                _check_block_fields(part, f"tool call {part.name!r}")
            function.update(name=part.name, arguments=part.arguments)
            call.update(id=part.id, type="function", function=function)
            tool_calls.append(call)
        elif isinstance(part, ThinkingPart | RedactedThinkingPart) and not same_format:
            # This API takes no reasoning back; like the Anthropic API, which ignores the
            # thinking of earlier turns, the rest of the turn goes on without it.
            continue
        else:
            content.append(_encode_part(part, same_format))
    if content or tool_calls or not out:
        wire: dict[str, Any] = dict(message.extra) if same_format else {}
        role = common.unmodeled_role(message)
        if not same_format and role is not None:
            raise Untranslatable(f"Message role {role!r}", NAME)
        if not same_format and message.extra:
            raise Untranslatable(f"Field `{next(iter(message.extra))}` of a message", NAME)
        # ``extra`` keeps a role the canonical model has no name for, and ``developer``.
        wire["role"] = message.extra.get("role", message.role) if same_format \
            else message.role
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
    if isinstance(part, OpaquePart):
        if part.format != NAME:
            raise Untranslatable(f"Content block type {part.kind!r}", NAME)
        return part.data
    if not same_format:
        _check_block_fields(part, f"a {type(part).__name__}")
    if isinstance(part, TextPart):
        text: dict[str, Any] = dict(part.extra) if same_format else {}
        text.update(type="text", text=part.text)
        return text
    if isinstance(part, ImagePart):
        url = part.url or f"data:{part.media_type};base64,{part.data}"
        image: dict[str, Any] = dict(part.extra) if same_format else {}
        image["url"] = url
        return {"type": "image_url", "image_url": image}
    if isinstance(part, DocumentPart):
        if part.data:
            file = {"file_data": f"data:{part.media_type};base64,{part.data}"}
            if part.name:
                file["filename"] = part.name
            return {"type": "file", "file": file}
        if part.text:
            title = f"{part.name}\n\n" if part.name else ""
            return {"type": "text", "text": title + part.text}
        raise Untranslatable("A document given by URL", NAME)
    raise Untranslatable(f"A {type(part).__name__} in this place", NAME)


def _encode_tool(tool: Tool, same_format: bool) -> dict[str, Any]:
    if tool.type:
        if tool.format != NAME:
            raise Untranslatable(f"Tool {tool.name!r} of type {tool.type!r}", NAME)
        return {"type": tool.type, **tool.extra}
    function: dict[str, Any] = dict(tool.extra) if same_format else {}
    if not same_format:
        for key, value in tool.extra.items():
            if key == "strict":  # the one tool field both APIs have
                function[key] = value
            elif key not in ("cache_control", "defer_loading", "type"):
                raise Untranslatable(f"Field `{key}` of tool {tool.name!r}", NAME)
    function["name"] = tool.name
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


# --- provider response -> canonical ------------------------------------------------------


class _WireResponse(msgspec.Struct):
    choices: list[dict[str, Any]]
    id: str = ""
    model: str = ""
    usage: dict[str, Any] | None = None


_RESPONSE_FIELDS = frozenset({"id", "object", "model", "choices", "usage"})
_CHOICE_FIELDS = frozenset({"index", "message", "finish_reason"})
_ANSWER_FIELDS = frozenset({"role", "content", "tool_calls", "reasoning_content"})
_USAGE_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def decode_usage(usage: dict[str, Any] | None) -> Usage:
    if not usage:
        return Usage()
    return common.usage_from(usage, "prompt_tokens", "completion_tokens",
                             "prompt_tokens_details", _USAGE_FIELDS)


def encode_usage(usage: Usage, same_format: bool) -> dict[str, Any]:
    wire: dict[str, Any] = dict(usage.extra) if same_format else {}
    wire.update(prompt_tokens=usage.input_tokens, completion_tokens=usage.output_tokens,
                total_tokens=usage.total_tokens)
    if usage.cache_read_tokens or "prompt_tokens_details" in wire:
        wire["prompt_tokens_details"] = {**wire.get("prompt_tokens_details", {}),
                                         "cached_tokens": usage.cache_read_tokens}
    return wire


def _decode_choice(choice: dict[str, Any], response_id: str, model: str) -> Response:
    message = choice.get("message")
    if not isinstance(message, dict):
        raise UpstreamError(502, "Provider sent a choice without a message")
    content: list[Part] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append(ThinkingPart(thinking=reasoning))
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append(TextPart(text=text))
    elif not text and isinstance(message.get("refusal"), str):
        content.append(TextPart(text=message["refusal"]))
    for j, call in enumerate(message.get("tool_calls") or ()):
        try:
            content.append(_decode_tool_call(call, f"choices[].message.tool_calls[{j}]"))
        except BadRequest as exc:
            raise UpstreamError(502, f"Provider sent an invalid response: {exc.message}") \
                from None
    choice_extra = known_extra(choice, _CHOICE_FIELDS)
    message_extra = known_extra(message, _ANSWER_FIELDS)
    if message_extra:
        choice_extra["message"] = message_extra
    finish = choice.get("finish_reason")
    return Response(id=response_id, model=model, content=content,
                    finish_reason=_FINISH_IN.get(finish, "stop"),
                    choice_extra=choice_extra)


def decode_response(body: bytes) -> Response:
    try:
        raw = msgspec.json.decode(body)
        wire = msgspec.convert(raw, _WireResponse)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise UpstreamError(502, f"Provider sent an invalid response: {exc}") from None
    if not wire.choices:
        raise UpstreamError(502, "Provider sent a response without choices")
    choices = wire.choices
    if len(choices) > 1:
        choices = sorted(choices, key=lambda c: c.get("index", 0)
                         if isinstance(c.get("index", 0), int) else 0)
    response, *alternatives = [_decode_choice(c, wire.id, wire.model) for c in choices]
    response.usage = decode_usage(wire.usage)
    response.extra = known_extra(raw, _RESPONSE_FIELDS)
    response.alternatives = alternatives
    return response


# --- canonical -> client response -------------------------------------------------------


def _response_id(response_id: str) -> str:
    return response_id if response_id.startswith("chatcmpl") else f"chatcmpl-{response_id}"


def _encode_choice(response: Response, index: int, same_format: bool) -> dict[str, Any]:
    extra = response.choice_extra if same_format else {}
    message: dict[str, Any] = dict(extra.get("message") or {})
    message.update(role="assistant", content=response.text or None)
    thinking = "".join(p.thinking for p in response.content if isinstance(p, ThinkingPart))
    if thinking:
        # Reasoning as OpenAI-compatible servers send it; OpenAI's own API has no field.
        message["reasoning_content"] = thinking
    calls = response.tool_calls
    if calls:
        message["tool_calls"] = [
            {**({k: v for k, v in c.extra.items() if k != "function"} if same_format else {}),
             "id": c.id, "type": "function",
             "function": {**((c.extra.get("function") or {}) if same_format else {}),
                          "name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    choice = {k: v for k, v in extra.items() if k != "message"}
    choice.update(index=index, message=message, finish_reason=response.finish_reason)
    choice.setdefault("logprobs", None)
    return choice


def encode_response(response: Response, *, same_format: bool) -> bytes:
    body: dict[str, Any] = dict(response.extra) if same_format else {}
    choices = [_encode_choice(response, 0, same_format)]
    choices.extend(_encode_choice(alternative, i, same_format)
                   for i, alternative in enumerate(response.alternatives, 1))
    body.update(
        id=_response_id(response.id),
        object="chat.completion",
        created=body.get("created") or int(time.time()),
        model=response.model,
        choices=choices,
        usage=encode_usage(response.usage, same_format),
    )
    return _encode(body)


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
    reasoning_content: str | None = None
    tool_calls: list[_DeltaToolCall] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: Any = None


class _Chunk(msgspec.Struct):
    id: str = ""
    model: str = ""
    choices: list[_ChunkChoice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_DONE = b"data: [DONE]\n\n"


class _ChoiceState:
    """Block numbering for one of the ``n`` choices."""

    __slots__ = ("kind", "next_index", "text_index", "tool_index")

    def __init__(self) -> None:
        self.kind = ""
        self.next_index = 0
        self.text_index: int | None = None
        self.tool_index: dict[int, int] = {}  # tool_calls[].index -> block index

    def block(self, kind: str) -> int:
        """The block for more text (or reasoning: ``kind``), opening one if the last
        block is not of that kind."""
        if self.text_index is None or self.text_index != self.next_index - 1 \
                or kind != self.kind:
            self.text_index = self.next_index
            self.next_index += 1
            self.kind = kind
        return self.text_index


class StreamDecoder:
    """Turns a provider's ``data:`` payloads into canonical stream events.
    ``same_format``: each event keeps its bytes (``raw``) to pass on as they are."""

    def __init__(self, request: Request | None = None, same_format: bool = False) -> None:
        self.keep_raw = same_format
        # The usage chunk hookproxy asks for goes to a client that asked for it too.
        self.client_usage = bool(request is not None and request.stream_usage)
        self.started = False
        self.ended = False
        self.choices: dict[int, _ChoiceState] = {}
        self.finish: FinishReason = "stop"
        self.finish_seen = False
        self.usage = Usage()
        self.pending = b""  # bytes that go out with the end: the finish and usage chunks

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        if data.strip() == b"[DONE]":
            return self.finish_events(self.pending + _DONE if self.keep_raw else None)
        try:
            chunk = _decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise UpstreamError(502, f"Provider sent a malformed stream chunk: {exc}") from None
        if chunk.error is not None:
            error = chunk.error
            message = error.get("message", error) if isinstance(error, dict) else error
            raise UpstreamError(502, f"Provider error mid-stream: {message}")
        raw = b"data: " + data + b"\n\n" if self.keep_raw else None
        out: list[StreamEvent] = []
        if not self.started:
            self.started = True
            out.append(StreamStart(id=chunk.id, model=chunk.model))
        if chunk.usage is not None:
            self.usage = decode_usage(chunk.usage)
        finished = False
        for choice in chunk.choices or ():
            state = self.choices.get(choice.index)
            if state is None:
                state = self.choices[choice.index] = _ChoiceState()
            delta = choice.delta
            if delta is not None:
                out.extend(self._delta(choice, delta, state))
            if choice.finish_reason and choice.index == 0:
                self.finish = _FINISH_IN.get(choice.finish_reason, "stop")
                self.finish_seen = finished = True
        if raw is None:
            return out
        if out:
            out[0].raw = raw
            for item in out[1:]:
                item.raw = b""
            return out
        if finished or (chunk.usage is not None and not chunk.choices):
            # The end's chunks go out with the end (the usage one if the client asked).
            if self.client_usage or chunk.choices:
                self.pending += raw
            return []
        return [WireEvent(format=NAME, raw=raw)]

    def _delta(self, choice: _ChunkChoice, delta: _Delta, state: _ChoiceState
               ) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if delta.reasoning_content:
            out.append(ThinkingDelta(index=state.block("thinking"),
                                     thinking=delta.reasoning_content))
        text = delta.content or delta.refusal
        if text:
            out.append(TextDelta(index=state.block("text"), text=text, choice=choice.index,
                                 logprobs=choice.logprobs))
        for call in delta.tool_calls or ():
            function = call.function or _DeltaFunction()
            if call.index not in state.tool_index:
                state.tool_index[call.index] = state.next_index
                state.next_index += 1
                out.append(ToolCallStart(index=state.tool_index[call.index], id=call.id or "",
                                         name=function.name or "", choice=choice.index))
            if function.arguments:
                out.append(ToolCallDelta(index=state.tool_index[call.index],
                                         arguments=function.arguments, choice=choice.index))
        return out

    def finish_events(self, raw: bytes | None = None) -> list[StreamEvent]:
        if self.ended:
            return []
        self.ended = True
        return [StreamEnd(finish_reason=self.finish, usage=self.usage, raw=raw)]

    def close(self) -> list[StreamEvent]:
        """The provider closed the stream; some servers end without ``[DONE]``."""
        if self.ended or self.finish_seen:
            return self.finish_events(self.pending if self.keep_raw else None)
        raise UpstreamError(502, "Provider stream ended before the answer was complete")


class StreamEncoder:
    """Turns canonical stream events into the client's ``data:`` chunks. An event that
    carries the provider's bytes (``raw``) goes out as them."""

    media_type = "text/event-stream"

    def __init__(self, request: Request) -> None:
        self.include_usage = request.stream_usage
        self.id = "chatcmpl-"
        self.model = request.model
        self.created = int(time.time())
        # (choice, block index) -> tool_calls[].index, and how many each choice has.
        self.tool_index: dict[tuple[int, int], int] = {}
        self.tool_count: dict[int, int] = {}
        self._prefix()

    def _prefix(self) -> None:
        # Text deltas are most of a stream: their chunk is a template around the text.
        self.text_prefix = (b'data: {"id":' + _encode(self.id)
                            + b',"object":"chat.completion.chunk","created":'
                            + str(self.created).encode() + b',"model":' + _encode(self.model)
                            + b',"choices":[{"index":0,"delta":{"content":')
        self.text_suffix = b'},"finish_reason":null}]}\n\n'

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, choice: int = 0,
               logprobs: Any = None) -> bytes:
        entry: dict[str, Any] = {"index": choice, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            entry["logprobs"] = logprobs
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [entry],
        }
        return b"data: " + _encode(chunk) + b"\n\n"

    def _tool_position(self, event: ToolCallStart) -> int:
        position = self.tool_count.get(event.choice, 0)
        self.tool_count[event.choice] = position + 1
        self.tool_index[event.choice, event.index] = position
        return position

    def encode(self, event: StreamEvent) -> bytes:
        raw = event.raw
        if raw is not None:
            # The provider's own chunk: what later encoded chunks need is noted.
            if isinstance(event, ToolCallStart):
                self._tool_position(event)
            elif isinstance(event, StreamStart):
                self.id, self.model = _response_id(event.id), event.model or self.model
                self._prefix()
            return raw
        if isinstance(event, TextDelta):
            if event.choice or event.logprobs is not None:
                return self._chunk({"content": event.text}, choice=event.choice,
                                   logprobs=event.logprobs)
            return self.text_prefix + _encode(event.text) + self.text_suffix
        if isinstance(event, ToolCallDelta):
            position = self.tool_index.get((event.choice, event.index), 0)
            return self._chunk({"tool_calls": [
                {"index": position, "function": {"arguments": event.arguments}}
            ]}, choice=event.choice)
        if isinstance(event, ToolCallStart):
            return self._chunk({"tool_calls": [{
                "index": self._tool_position(event), "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }]}, choice=event.choice)
        if isinstance(event, ThinkingDelta):
            # Reasoning as OpenAI-compatible servers stream it; OpenAI's own API has none.
            return self._chunk({"reasoning_content": event.thinking}) if event.thinking else b""
        if isinstance(event, StreamStart):
            self.id = _response_id(event.id)
            self.model = event.model or self.model
            self._prefix()
            return self._chunk({"role": "assistant", "content": ""})
        if isinstance(event, StreamEnd):
            out = self._chunk({}, event.finish_reason)
            if self.include_usage:
                usage = {"id": self.id, "object": "chat.completion.chunk",
                         "created": self.created, "model": self.model, "choices": [],
                         "usage": encode_usage(event.usage, False)}
                out += b"data: " + _encode(usage) + b"\n\n"
            return out + _DONE
        # Signatures, other blocks, the other format's events: no form here.
        return b""

    def encode_error(self, error: ProxyError) -> bytes:
        return b"data: " + encode_error(error) + b"\n\n"
