"""json_repair: mends the answer to a request that asked for JSON
(``response_format`` json_object or json_schema) when it is not valid JSON: strips code
fences and prose around the value, drops trailing commas, closes what was left open.

    [plugins.json_repair]
    always = false     # true: try every answer that looks like it holds JSON

For a streaming request the repaired answer reaches the log and later hooks only: the
client already has the bytes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from proxy import RequestContext, Response, TextPart, hookimpl, reports_changes
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    always: bool = False


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _valid(text: str) -> bool:
    try:
        msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return True


def _close(text: str) -> str:
    """Closes strings, arrays and objects left open at the end of ``text``."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]" and stack:
            stack.pop()
    return text + ('"' if in_string else "") + "".join(reversed(stack))


def repair_json(text: str) -> str | None:
    """A valid JSON text made from ``text``, or None if it cannot be mended."""
    if _valid(text):
        return text
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    starts = [i for i in (candidate.find("{"), candidate.find("[")) if i >= 0]
    if not starts:
        return None
    candidate = candidate[min(starts):]
    end = max(candidate.rfind("}"), candidate.rfind("]"))
    for attempt in (candidate[: end + 1] if end >= 0 else candidate, candidate):
        mended = _close(_TRAILING_COMMA.sub(r"\1", attempt.strip()))
        mended = _TRAILING_COMMA.sub(r"\1", mended)
        if _valid(mended):
            return mended
    return None


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
@reports_changes
@no_plugin_context
def post_response(ctx: RequestContext, response: Response, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    format_ = ctx.request.response_format or {}
    asked = format_.get("type") in ("json_object", "json_schema")
    text = response.text
    if not text or not (asked or (config.always and ("{" in text or "[" in text))):
        return
    repaired = repair_json(text)
    if repaired is not None and repaired != text:
        calls = [p for p in response.content if not isinstance(p, TextPart)]
        response.content = [TextPart(text=repaired), *calls]
        ctx.changed()
        ctx.scratch["json_repaired"] = True
