"""features: tags what the request uses: ``tools``, ``images``, ``json`` (asked for JSON
output), ``streaming``, ``tool_results``.

    [classifiers.features]
    prefix = ""          # e.g. "uses:" gives "uses:tools"
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import ImagePart, RequestContext, ToolResultPart, hookimpl
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str = ""


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    request = ctx.request
    kinds = {type(p) for m in request.messages for p in m.content}  # one pass, in C
    tool_results = any(issubclass(kind, ToolResultPart) for kind in kinds)
    found = {
        "tools": bool(request.tools),
        "images": any(issubclass(kind, ImagePart) for kind in kinds) or (tool_results and any(
            isinstance(q, ImagePart) for m in request.messages for p in m.content
            if isinstance(p, ToolResultPart) for q in p.content)),
        "json": (request.response_format or {}).get("type") in ("json_object", "json_schema"),
        "streaming": request.stream,
        "tool_results": tool_results,
    }
    prefix = settings_as(settings, Settings).prefix
    return [prefix + name for name, present in found.items() if present]
