"""prompt_size: estimates the prompt's tokens (about four characters each, tools
included) and tags it at configured thresholds. The estimate is kept in
``ctx.scratch["estimated_tokens"]``.

    [classifiers.prompt_size.thresholds]
    long_context = 8000
    huge_context = 100000
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import RequestContext, TextPart, ToolCallPart, ToolResultPart, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error

CHARS_PER_TOKEN = 4
_encode = msgspec.json.Encoder().encode


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    thresholds: dict[str, int] = msgspec.field(
        default_factory=lambda: {"long_context": 8000})


def estimate_tokens(ctx: RequestContext) -> int:
    """Counts characters without joining or copying the text: a few microseconds for a
    whole agent history."""
    request = ctx.request
    characters = sum(len(p.text) for p in request.system)
    for message in request.messages:
        for part in message.content:
            if isinstance(part, TextPart):
                characters += len(part.text)
            elif isinstance(part, ToolCallPart):
                characters += len(part.arguments)
            elif isinstance(part, ToolResultPart):
                characters += sum(len(p.text) for p in part.content if isinstance(p, TextPart))
    if request.tools:
        characters += len(_encode(request.tools))
    return characters // CHARS_PER_TOKEN


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    tokens = ctx.scratch["estimated_tokens"] = estimate_tokens(ctx)
    return [tag for tag, threshold in settings_as(settings, Settings).thresholds.items()
            if tokens >= threshold]
