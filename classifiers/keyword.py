"""keyword: tags a request when its text contains any of a tag's words or phrases
(case-insensitive, whole words: "art" does not match "start").

    [classifiers.keyword]
    scope = "messages"        # "last" user message, all "messages", or "all" incl. system
    [classifiers.keyword.tags]
    billing = ["invoice", "refund", "credit card"]
    legal = ["contract", "GDPR"]
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import msgspec

from classifiers.scope import Scope, scoped_text
from proxy import RequestContext, hookimpl
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    tags: dict[str, list[str]] = {}
    scope: Scope = "messages"


@lru_cache(maxsize=256)
def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    text = scoped_text(ctx.request, config.scope)
    return [tag for tag, words in config.tags.items()
            if words and _pattern(tuple(words)).search(text)]
