"""system_prompt: puts a configured system prompt before, after or instead of the client's.

    [plugins.system_prompt]
    text = "You are a helpful assistant for ACME."
    mode = "prepend"          # "prepend" | "append" | "replace"
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from proxy import RequestContext, TextPart, hookimpl, reports_changes
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    mode: Literal["prepend", "append", "replace"] = "prepend"


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
@reports_changes
@no_plugin_context
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    part = TextPart(text=config.text)
    system = ctx.request.system
    if config.mode == "replace":
        ctx.request.system = [part]
    elif config.mode == "append":
        system.append(part)
    else:
        system.insert(0, part)
    ctx.changed()
