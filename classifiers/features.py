"""features: tags what the request uses: ``tools``, ``images``, ``json`` (asked for JSON
output), ``streaming``, ``tool_results``.

    [classifiers.features]
    prefix = ""          # e.g. "uses:" gives "uses:tools"
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import ImagePart, RequestContext, TextPart, ToolResultPart, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str = ""


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    request = ctx.request
    kinds = {type(p) for m in request.messages for p in m.content}  # one pass, in C
    # Most requests hold text alone: nothing more to look for.
    plain = kinds <= _TEXT
    tool_results = not plain and any(issubclass(kind, ToolResultPart) for kind in kinds)
    found = []
    if request.tools:
        found.append("tools")
    if not plain and (any(issubclass(kind, ImagePart) for kind in kinds) or (
            tool_results and any(isinstance(q, ImagePart) for m in request.messages
                                 for p in m.content if isinstance(p, ToolResultPart)
                                 for q in p.content))):
        found.append("images")
    if (request.response_format or {}).get("type") in ("json_object", "json_schema"):
        found.append("json")
    if request.stream:
        found.append("streaming")
    if tool_results:
        found.append("tool_results")
    prefix = settings_as(settings, Settings).prefix
    return [prefix + name for name in found] if prefix else found


_TEXT = frozenset({TextPart})
