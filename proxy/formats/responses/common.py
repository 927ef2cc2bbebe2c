"""Shapes the Responses request, answer and stream share: items <-> canonical parts,
usage, finish reasons."""

from __future__ import annotations

import os
from typing import Any

import msgspec

from proxy.canonical import (
    DocumentPart,
    FinishReason,
    ImagePart,
    OpaquePart,
    Part,
    RedactedThinkingPart,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
)
from proxy.errors import BadRequest
from proxy.formats.common import known_extra, parse_data_url, usage_from

NAME = "responses"
encode_json = msgspec.json.Encoder().encode
# An Anthropic redacted_thinking block, carried in a reasoning item's encrypted_content
# (a client sends reasoning items back as they came, so the next turn gets it back).
REDACTED_PREFIX = "redacted_thinking:"

_TEXT_FIELDS = frozenset({"type", "text"})
_CALL_FIELDS = frozenset({"type", "call_id", "name", "arguments"})
_OUTPUT_FIELDS = frozenset({"type", "call_id", "output"})
_REASONING_FIELDS = frozenset({"type", "summary", "encrypted_content"})
_USAGE_FIELDS = frozenset({"input_tokens", "output_tokens", "total_tokens"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def is_part_kind(kind: str) -> bool:
    """Whether an opaque Responses value of this type is a content part (else an item)."""
    return kind.startswith("input_") or kind in ("output_text", "refusal", "reasoning_text",
                                                 "summary_text")


def user_side(kind: str) -> bool:
    """Whether an item of this type is the client's (a tool's output, an approval, a
    reference) rather than the model's."""
    return kind.endswith("_output") or kind.endswith("_response") or kind == "item_reference"


# --- items -> canonical parts -----------------------------------------------------------


def _require(value: dict[str, Any], key: str, kind: type, where: str) -> Any:
    found = value.get(key)
    if not isinstance(found, kind):
        raise BadRequest(f"Invalid request: Expected `{kind.__name__}` at `$.{where}.{key}`")
    return found


def decode_part(part: object, where: str) -> Part:
    """A content part of a message (or of a function call's output)."""
    if not isinstance(part, dict):
        raise BadRequest(f"Invalid request: Expected `object` at `$.{where}`")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = _require(part, "text", str, where)
        return TextPart(text=text, extra=known_extra(part, _TEXT_FIELDS))
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        media_type, data = parse_data_url(part["image_url"])
        return ImagePart(url="" if data else part["image_url"], media_type=media_type,
                         data=data, extra=known_extra(part, {"type", "image_url"}))
    if kind == "input_file" and not part.get("file_id") and (
            isinstance(part.get("file_data"), str) or isinstance(part.get("file_url"), str)):
        name = part.get("filename")
        name = name if isinstance(name, str) else ""
        extra = known_extra(part, {"type", "file_data", "file_url", "filename"})
        if isinstance(part.get("file_url"), str):
            return DocumentPart(url=part["file_url"], name=name, extra=extra)
        media_type, data = parse_data_url(part["file_data"])
        if data:
            return DocumentPart(media_type=media_type, data=data, name=name, extra=extra)
    if not isinstance(kind, str):
        raise BadRequest(f"Invalid request: Expected `str` at `$.{where}.type`")
    # A file by id, audio, a refusal, a part type added last week.
    return OpaquePart(format=NAME, kind=kind, data=part)


def decode_parts(content: object, where: str) -> list[Part]:
    if isinstance(content, str):
        return [TextPart(text=content)]
    if not isinstance(content, list):
        raise BadRequest(f"Invalid request: Expected `str | array` at `$.{where}`")
    return [decode_part(part, f"{where}[{j}]") for j, part in enumerate(content)]


def decode_model_item(item: dict[str, Any], where: str) -> list[Part]:
    """The parts of an item the model produced: an assistant message, a function call,
    reasoning, or a built-in tool's call (kept whole)."""
    kind = item.get("type", "message")
    if kind == "message":
        parts = decode_parts(item.get("content"), f"{where}.content")
        meta = known_extra(item, {"type", "role", "content"})
        if meta:
            for part in parts:
                if isinstance(part, TextPart):
                    part.extra = {**part.extra, "item": meta}
        return parts
    if kind == "function_call":
        arguments = item.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = encode_json(arguments).decode()
        return [ToolCallPart(id=_require(item, "call_id", str, where),
                             name=_require(item, "name", str, where), arguments=arguments,
                             extra=known_extra(item, _CALL_FIELDS))]
    if kind == "reasoning":
        encrypted = item.get("encrypted_content")
        encrypted = encrypted if isinstance(encrypted, str) else ""
        extra = known_extra(item, _REASONING_FIELDS)
        if encrypted.startswith(REDACTED_PREFIX):
            return [RedactedThinkingPart(data=encrypted[len(REDACTED_PREFIX):], extra=extra)]
        summary = item.get("summary")
        texts = [s.get("text", "") for s in summary if isinstance(s, dict)] \
            if isinstance(summary, list) else []
        thinking = "".join(t for t in texts if isinstance(t, str))
        if isinstance(summary, list) and len(summary) > 1:
            extra["summary"] = summary  # its parts, to write back as they were
        return [ThinkingPart(thinking=thinking, signature=encrypted, extra=extra)]
    return [OpaquePart(format=NAME, kind=str(kind), data=item)]


def decode_output_item(item: dict[str, Any], where: str) -> ToolResultPart | OpaquePart:
    """An item the client sends back: a function call's output, or another (kept whole)."""
    if item.get("type") != "function_call_output":
        return OpaquePart(format=NAME, kind=str(item.get("type")), data=item)
    output = item.get("output")
    content = decode_parts(output, f"{where}.output") if output is not None else []
    results: list[TextPart | ImagePart | DocumentPart | OpaquePart] = []
    for part in content:
        if not isinstance(part, TextPart | ImagePart | DocumentPart | OpaquePart):
            raise BadRequest(f"Invalid request: `$.{where}.output` cannot hold a "
                             f"{type(part).__name__}")
        results.append(part)
    extra = known_extra(item, _OUTPUT_FIELDS)
    if isinstance(output, str):
        extra["output_text"] = True  # the output was a string: it goes back as one
    return ToolResultPart(tool_call_id=_require(item, "call_id", str, where), content=results,
                          extra=extra)


# --- canonical parts -> items -----------------------------------------------------------


def encode_part(part: Part, assistant: bool = False) -> dict[str, Any]:
    """A content part of a message."""
    if isinstance(part, OpaquePart):
        return part.data
    if isinstance(part, TextPart):
        extra = {k: v for k, v in part.extra.items() if k not in ("item", "role")}
        if assistant:
            extra.setdefault("annotations", [])
        return {**extra, "type": "output_text" if assistant else "input_text",
                "text": part.text}
    if isinstance(part, ImagePart):
        url = part.url or f"data:{part.media_type};base64,{part.data}"
        return {**part.extra, "type": "input_image", "image_url": url,
                "detail": part.extra.get("detail", "auto")}
    if isinstance(part, DocumentPart):
        if part.url:
            return {**part.extra, "type": "input_file", "file_url": part.url}
        if part.data:
            file = {**part.extra, "type": "input_file",
                    "file_data": f"data:{part.media_type};base64,{part.data}"}
            if part.name:
                file["filename"] = part.name
            return file
        title = f"{part.name}\n\n" if part.name else ""
        return {"type": "input_text", "text": title + part.text}
    raise TypeError(f"a {type(part).__name__} is not a content part")


def encode_result(part: ToolResultPart) -> dict[str, Any]:
    extra = {k: v for k, v in part.extra.items() if k != "output_text"}
    texts = [p for p in part.content if isinstance(p, TextPart)]
    output: str | list[dict[str, Any]]
    if len(texts) == len(part.content) and (part.extra.get("output_text") or not part.extra):
        output = "".join(p.text for p in texts)
    else:
        output = [encode_part(p) for p in part.content]
    return {**extra, "type": "function_call_output", "call_id": part.tool_call_id,
            "output": output}


def encode_model_parts(parts: list[Part], ids: bool, status: str | None = None
                       ) -> list[dict[str, Any]]:
    """The items for what the model said: consecutive text of one message item together,
    each call, reasoning and built-in tool call an item of its own. ``ids``: give every
    item an id (answers have them; input items may go without)."""
    items: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None
    for part in parts:
        if isinstance(part, TextPart) or (isinstance(part, OpaquePart) and part.format == NAME
                                          and is_part_kind(part.kind)):
            meta = part.extra.get("item") if isinstance(part, TextPart) else None
            if message is None or (meta is not None and meta.get("id") != message.get("id")):
                message = {**(meta or {}), "type": "message", "role": "assistant",
                           "content": []}
                if ids:
                    message.setdefault("id", new_id("msg"))
                if status:
                    message.setdefault("status", status)
                items.append(message)
            message["content"].append(encode_part(part, assistant=True))
            continue
        message = None
        if isinstance(part, ToolCallPart):
            item = {**part.extra, "type": "function_call", "call_id": part.id,
                    "name": part.name, "arguments": part.arguments}
        elif isinstance(part, ThinkingPart):
            summary = part.extra.get("summary")
            if not (isinstance(summary, list) and "".join(
                    str(s.get("text", "")) for s in summary if isinstance(s, dict))
                    == part.thinking):
                summary = [{"type": "summary_text", "text": part.thinking}] \
                    if part.thinking else []
            item = {**part.extra, "type": "reasoning", "summary": summary}
            if part.signature:
                item["encrypted_content"] = part.signature
        elif isinstance(part, RedactedThinkingPart):
            item = {**part.extra, "type": "reasoning", "summary": [],
                    "encrypted_content": REDACTED_PREFIX + part.data}
        elif isinstance(part, OpaquePart):
            if part.format != NAME:
                continue  # another API's server-tool block: a Responses client has no use
            items.append(part.data)
            continue
        else:
            continue
        if ids:
            item.setdefault("id", new_id({"function_call": "fc", "reasoning": "rs"}[
                item["type"]]))
        if status and item["type"] == "function_call":
            item.setdefault("status", status)
        items.append(item)
    return items


# --- usage and finish -------------------------------------------------------------------


def decode_usage(usage: object) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    return usage_from(usage, "input_tokens", "output_tokens", "input_tokens_details",
                      _USAGE_FIELDS)


def encode_usage(usage: Usage, same_format: bool) -> dict[str, Any]:
    wire: dict[str, Any] = dict(usage.extra) if same_format else {}
    wire.update(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                total_tokens=usage.total_tokens)
    wire["input_tokens_details"] = {**wire.get("input_tokens_details", {}),
                                    "cached_tokens": usage.cache_read_tokens}
    wire.setdefault("output_tokens_details", {"reasoning_tokens": 0})
    return wire


def finish_of(status: object, incomplete: object, has_calls: bool) -> FinishReason:
    if status == "incomplete":
        reason = incomplete.get("reason") if isinstance(incomplete, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_calls else "stop"


def status_of(finish: FinishReason) -> tuple[str, dict[str, str] | None]:
    """The response's ``status`` and ``incomplete_details`` for a finish reason."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None
