"""A Responses request: the client's body -> canonical, canonical -> a Responses-capable
provider's body, and canonical -> what another provider's encoder takes."""

from __future__ import annotations

from typing import Any

import msgspec

from proxy.canonical import (
    DocumentPart,
    ImagePart,
    Message,
    OpaquePart,
    Part,
    RedactedThinkingPart,
    Request,
    TextPart,
    ThinkingPart,
    Tool,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
    remember_wire,
    wire_of,
)
from proxy.errors import BadRequest, Untranslatable
from proxy.formats.common import decode_json, known_extra
from proxy.formats.responses.common import (
    NAME,
    decode_model_item,
    decode_output_item,
    decode_parts,
    encode_json,
    encode_model_parts,
    encode_part,
    encode_result,
    user_side,
)


class _ResponsesRequest(msgspec.Struct):
    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    text: dict[str, Any] | None = None
    user: str | None = None


# ``text`` is read (its format) and kept in ``extra`` for its other keys.
_REQUEST_FIELDS = frozenset(_ResponsesRequest.__struct_fields__) - {"text"}
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters"})
# Fields of a Responses request that another API has no place for and that change nothing
# it answers (storage, caching and tracing hints, defaults); anything else is refused.
_DROPPABLE = frozenset({
    "store", "include", "metadata", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "service_tier", "truncation", "client_metadata", "stream_options",
    "reasoning", "text"})
_DEFAULTS: dict[str, tuple[Any, ...]] = {"background": (False,), "top_logprobs": (0,)}
# Fields of items and parts that say what the client's own API needs (ids, statuses,
# annotations of an earlier answer, how sharp an image should be): they may go.
_DROPPABLE_PART_FIELDS = frozenset({"item", "role", "id", "status", "annotations",
                                    "logprobs", "detail", "output_text", "summary",
                                    "content", "phase"})
# reasoning.effort -> what the other encoders take: OpenAI Chat Completions' effort names.
_EFFORTS = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
            "xhigh": "high"}


# --- client request -> canonical --------------------------------------------------------


def decode_request(body: bytes) -> Request:
    raw = decode_json(body)
    try:
        wire = msgspec.convert(raw, _ResponsesRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from None
    system: list[TextPart] = []
    if wire.instructions:
        system.append(TextPart(text=wire.instructions))
    items = input_items(raw)
    messages = decode_items(items, system)
    extra = known_extra(raw, _REQUEST_FIELDS)
    text = dict(wire.text or {})
    response_format = _decode_format(text.pop("format", None))
    if text:
        extra["text"] = text
    else:
        extra.pop("text", None)
    choice = _decode_tool_choice(wire.tool_choice)
    if choice is None and wire.tool_choice is not None:
        extra["tool_choice"] = wire.tool_choice  # a shape not modeled: kept as it came
    request = Request(
        model=wire.model,
        messages=messages,
        system=system,
        tools=[_decode_tool(t, i) for i, t in enumerate(wire.tools or ())],
        tool_choice=choice,
        parallel_tool_calls=wire.parallel_tool_calls,
        max_tokens=wire.max_output_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stream=bool(wire.stream),
        stream_usage=True,
        response_format=response_format,
        user=wire.user,
        extra=extra,
    )
    remember_wire(request, raw)
    return request


def input_items(body: dict[str, Any]) -> list[Any]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return list(value)


def decode_items(items: list[Any], system: list[TextPart] | None = None) -> list[Message]:
    """Input items -> messages. Leading system and developer messages go to ``system``
    (when it is given); the model's items in a row (text, reasoning, calls) make one
    assistant message, the client's tool outputs in a row one user message. Each message
    remembers the items it came from."""
    messages: list[Message] = []
    merged: dict[int, Message] = {}
    leading = system is not None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid request: Expected `object` at `$.{where}`")
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.type`")
        role = item.get("role") if kind == "message" else None
        if kind == "message" and role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(f"Invalid request: `$.{where}.role` must be one of user, "
                             "assistant, system, developer")
        if role == "assistant" or (kind != "message" and not user_side(kind)):
            _append(messages, "assistant", decode_model_item(item, where), item, merged)
            leading = False
            continue
        if kind != "message":
            _append(messages, "user", [decode_output_item(item, where)], item, merged)
            leading = False
            continue
        parts = decode_parts(item.get("content"), f"{where}.content")
        meta = known_extra(item, {"role", "content"})
        if role in ("system", "developer"):
            if leading and system is not None and all(
                    isinstance(p, TextPart) and not p.extra for p in parts):
                marks = {"role": role, **({"item": meta} if meta else {})}
                system.extend(TextPart(text=p.text, extra=marks) for p in parts
                              if isinstance(p, TextPart))
                continue
            message = Message(role="system", content=parts, extra={**meta, "role": role})
        else:
            message = Message(role="user", content=parts, extra=meta)
        leading = False
        remember_wire(message, [item])
        messages.append(message)
    for message in merged.values():
        remember_wire(message, wire_of(message))  # its fingerprint as merged
    return messages


def _append(messages: list[Message], role: str, parts: list[Part], item: dict[str, Any],
            merged: dict[int, Message]) -> None:
    last = messages[-1] if messages else None
    if last is not None and last.role == role and not last.extra and (
            role == "assistant" or all(isinstance(p, ToolResultPart | OpaquePart)
                                       for p in last.content)):
        last.content.extend(parts)
        wire_of(last).append(item)
        merged[id(last)] = last
        return
    message = Message(role=role, content=parts)  # type: ignore[arg-type]
    remember_wire(message, [item])
    messages.append(message)


def _decode_format(value: object) -> dict[str, Any] | None:
    """``text.format`` as the canonical response format (Chat Completions' shape)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadRequest("Invalid request: Expected `object` with a `type` at `$.text.format`")
    kind = value["type"]
    if kind == "text":
        return {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema",
                "json_schema": {k: v for k, v in value.items() if k != "type"}}
    return {"type": kind, **{k: v for k, v in value.items() if k != "type"}}


def _decode_tool(tool: object, index: int) -> Tool:
    if not isinstance(tool, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.tools[{index}]`")
    kind = tool.get("type", "function")
    if kind != "function":
        # A built-in tool (web_search, file_search, computer_use...) or a kind added
        # last week: only a Responses-capable provider can take it.
        name = tool.get("name")
        return Tool(name=name if isinstance(name, str) else str(kind), type=str(kind),
                    format=NAME, extra=known_extra(tool, {"type"}))
    name = tool.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.tools[{index}].name`")
    parameters = tool.get("parameters")
    return Tool(name=name, description=tool.get("description") or "",
                parameters=parameters if isinstance(parameters, dict) else {},
                extra=known_extra(tool, _TOOL_FIELDS))


def _decode_tool_choice(choice: str | dict[str, Any] | None) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise BadRequest(f"Invalid request: unknown tool_choice {choice[:40]!r}")
        return ToolChoice(mode=choice)  # type: ignore[arg-type]
    if choice.get("type") == "function" and isinstance(choice.get("name"), str) \
            and len(choice) == 2:
        return ToolChoice(mode="tool", name=choice["name"])
    return None  # allowed_tools, a built-in tool, a custom tool...


# --- canonical -> a Responses-capable provider ------------------------------------------


def encode_request(request: Request, model: str, *, same_format: bool = True) -> bytes:
    """The request for a provider that has the Responses API; what no plugin changed goes
    as it came."""
    body: dict[str, Any] = dict(request.extra)
    wire = wire_of(request) or {}
    instructions = [p.text for p in request.system if "role" not in p.extra]
    if instructions:
        body["instructions"] = "\n\n".join(instructions)
    items = _encode_system(request.system)
    for message in request.messages:
        original = wire_of(message)
        if original is not None and decode_items(original) == [message]:
            items.extend(original)  # unchanged: as it came
        else:
            items.extend(_encode_message(message))
    if isinstance(wire.get("input"), str) and len(items) == 1 and items[0] == {
            "role": "user", "content": wire["input"]}:
        body["input"] = wire["input"]
    else:
        body["input"] = items
    body["model"] = model
    if request.tools:
        body["tools"] = [_encode_tool(t) for t in request.tools]
    choice = request.tool_choice
    if choice is not None:
        body["tool_choice"] = ({"type": "function", "name": choice.name}
                               if choice.mode == "tool" else choice.mode)
    for key, value in (("parallel_tool_calls", request.parallel_tool_calls),
                       ("max_output_tokens", request.max_tokens),
                       ("temperature", request.temperature), ("top_p", request.top_p),
                       ("user", request.user)):
        if value is not None:
            body[key] = value
    if request.response_format is not None:
        body["text"] = {**body.get("text", {}), "format": _encode_format(
            request.response_format)}
    if request.stream:
        body["stream"] = True
    return encode_json(body)


def stream_body(request: Request, raw_body: bytes) -> bytes:
    """A streaming request nothing changed goes as the client's body."""
    return raw_body


def _encode_system(system: list[TextPart]) -> list[dict[str, Any]]:
    """The leading system and developer messages (system parts that say their role)."""
    items: list[dict[str, Any]] = []
    for part in system:
        role = part.extra.get("role")
        if role is None:
            continue
        meta = part.extra.get("item") or {}
        last = items[-1] if items else None
        if last is not None and last["role"] == role and meta and last.get("id") == meta.get(
                "id"):
            last["content"].append({"type": "input_text", "text": part.text})
            continue
        items.append({**meta, "role": role,
                      "content": [{"type": "input_text", "text": part.text}]})
    return items


def _encode_message(message: Message) -> list[dict[str, Any]]:
    if message.role == "assistant":
        return encode_model_parts(message.content, ids=False)
    items: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ToolResultPart):
            items.append(encode_result(part))
        elif isinstance(part, OpaquePart) and not _is_content(part):
            items.append(part.data)
        else:
            content.append(encode_part(part))
    if content or not items:
        role = message.extra.get("role", "system") if message.role == "system" else "user"
        meta = {k: v for k, v in message.extra.items() if k != "role"}
        items.insert(0, {**meta, "role": role, "content": content})
    return items


def _is_content(part: OpaquePart) -> bool:
    return part.format == NAME and part.kind.startswith("input_")


def _encode_tool(tool: Tool) -> dict[str, Any]:
    if tool.type:
        if tool.format != NAME:
            raise Untranslatable(f"Tool {tool.name!r} of type {tool.type!r}", NAME)
        return {**tool.extra, "type": tool.type}
    wire: dict[str, Any] = {**tool.extra, "type": "function", "name": tool.name}
    if tool.description:
        wire["description"] = tool.description
    wire["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return wire


def _encode_format(response_format: dict[str, Any]) -> dict[str, Any]:
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = response_format.get("json_schema") or {}
        return {"type": "json_schema", **schema}
    return dict(response_format)


# --- canonical -> another provider's encoder --------------------------------------------


def for_format(request: Request, target: str) -> Request:
    """A copy of a Responses client's ``request`` as the encoder of ``target`` (an
    ``openai`` or ``anthropic`` provider, or the ``mock``) takes a request from another
    format. Hints that change nothing it answers go; ``reasoning.effort`` becomes the
    effort those encoders translate; what has no counterpart there is an
    ``Untranslatable`` naming it."""
    extra: dict[str, Any] = {}
    for key, value in request.extra.items():
        if value is None or key in _DROPPABLE or value in _DEFAULTS.get(key, ()):
            continue
        raise Untranslatable(f"Field `{key}` = {_shown(value)}", target)
    reasoning = request.extra.get("reasoning")
    effort = _EFFORTS.get(str(reasoning.get("effort"))) if isinstance(reasoning, dict) \
        else None
    if effort and target == "openai":
        # The Chat Completions encoder takes an Anthropic client's effort this way.
        extra.update(thinking={"type": "adaptive"}, output_config={"effort": effort})
    elif effort and target == "anthropic":
        extra["reasoning_effort"] = effort
    for tool in request.tools:
        if tool.type:
            raise Untranslatable(f"Built-in tool {tool.type!r}", target)
    return msgspec.structs.replace(
        request, extra=extra,
        system=[TextPart(text=p.text) for p in request.system],
        messages=[_plain(m, target) for m in request.messages],
        tools=[_plain_tool(t, target) for t in request.tools])


def _plain(message: Message, target: str) -> Message:
    content: list[Part] = []
    for part in message.content:
        if isinstance(part, ThinkingPart) and (target != "anthropic" or not part.signature):
            continue  # nothing another API can check; Anthropic ignores earlier turns'
        if isinstance(part, ToolCallPart) and part.extra.get("namespace"):
            raise Untranslatable(f"A call to tool {part.name!r} of namespace "
                                 f"{part.extra['namespace']!r}", target)
        if isinstance(part, OpaquePart):
            content.append(part)
            continue
        extra = _plain_extra(part, target)
        if isinstance(part, ToolResultPart):
            inner = [msgspec.structs.replace(p, extra=_plain_extra(p, target))
                     if not isinstance(p, OpaquePart) else p for p in part.content]
            content.append(msgspec.structs.replace(part, extra=extra, content=inner))
        elif isinstance(part, TextPart | ImagePart | DocumentPart | ThinkingPart
                        | RedactedThinkingPart | ToolCallPart):
            content.append(msgspec.structs.replace(part, extra=extra))
    return Message(role=message.role, content=content, name=message.name)


def _plain_extra(part: Any, target: str) -> dict[str, Any]:
    for key in part.extra:
        if key not in _DROPPABLE_PART_FIELDS:
            raise Untranslatable(f"Field `{key}` of a {type(part).__name__}", target)
    return {}


def _plain_tool(tool: Tool, target: str) -> Tool:
    extra = {}
    for key, value in tool.extra.items():
        if key == "strict":  # the one function field every API has
            extra[key] = value
        elif value is not None:
            raise Untranslatable(f"Field `{key}` of tool {tool.name!r}", target)
    return msgspec.structs.replace(tool, extra=extra)


def _shown(value: object) -> str:
    text = encode_json(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."
