"""regex: tags a request when its text matches a tag's regular expression.

    [classifiers.regex]
    scope = "messages"
    [classifiers.regex.tags]
    ticket = "\\b[A-Z]{2,}-\\d+\\b"
    url = "https?://"
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from classifiers.scope import Scope, scoped_text
from proxy import RequestContext, hookimpl
from proxy.settings import regex_error, settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    tags: dict[str, str] = {}
    scope: Scope = "messages"


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings) or regex_error(settings.get("tags") or {},
                                                              "tags")


@hookimpl(trylast=True)
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    text = scoped_text(ctx.request, config.scope)
    return [tag for tag, pattern in config.tags.items() if re.search(pattern, text)]
