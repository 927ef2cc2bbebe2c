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
    parts = [p for m in request.messages for p in m.content]
    found = {
        "tools": bool(request.tools),
        "images": any(isinstance(p, ImagePart) or (isinstance(p, ToolResultPart) and any(
            isinstance(q, ImagePart) for q in p.content)) for p in parts),
        "json": (request.response_format or {}).get("type") in ("json_object", "json_schema"),
        "streaming": request.stream,
        "tool_results": any(isinstance(p, ToolResultPart) for p in parts),
    }
    prefix = settings_as(settings, Settings).prefix
    return [prefix + name for name, present in found.items() if present]
