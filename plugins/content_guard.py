"""content_guard: refuses requests whose prompt matches configured patterns.

    [plugins.content_guard]
    patterns = ["(?i)\\bcredit card number\\b", "(?i)ignore (all )?previous instructions"]
    action = "reject"          # "reject": an error with `status`; "refuse": a canned answer
    status = 400
    message = "This request is not allowed by the proxy's content policy."
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from proxy import Reject, RequestContext, Response, TextPart, hookimpl
from proxy.settings import regex_error, settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    patterns: list[str]
    action: Literal["reject", "refuse"] = "reject"
    status: int = 400
    message: str = "This request is not allowed by the proxy's content policy."


def _matches(patterns: list[str], text: str) -> bool:
    # re caches compiled patterns; each is compiled on its own so that each may carry
    # its own flags, such as (?i).
    return any(re.search(pattern, text) for pattern in patterns)


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings) or regex_error(settings["patterns"], "patterns")


@hookimpl(trylast=True)
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    config = settings_as(settings, Settings)
    if not config.patterns or not _matches(config.patterns, ctx.request.prompt_text()):
        return None
    if config.action == "reject":
        raise Reject(config.status, config.message, code="content_policy")
    return Response(id=f"guard-{ctx.request_id}", model=ctx.request.model,
                    content=[TextPart(text=config.message)], finish_reason="content_filter")
