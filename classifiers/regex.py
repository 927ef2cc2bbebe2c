"""regex: tags a request when its text matches a tag's regular expression.

    [classifiers.regex]
    scope = "messages"
    max_chars = 100000        # the newest text scanned, at most
    [classifiers.regex.tags]
    ticket = "\\b[A-Z]{2,}-\\d+\\b"
    url = "https?://"

The patterns run on RE2: in time linear in the text, all of them in one pass; RE2 has no
lookaround and no backreferences, and a pattern that uses them is a settings error.
"""

from __future__ import annotations

from typing import Any

import msgspec

from classifiers.scope import MAX_CHARS, Scope, max_chars_problem, union_over_texts
from proxy import RequestContext, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.settings import regex_error, settings_as, settings_error
from proxy.textmatch import pattern_set


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    tags: dict[str, str] = {}
    scope: Scope = "messages"
    max_chars: int = MAX_CHARS


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return (settings_error(settings, Settings) or max_chars_problem(settings.get("max_chars"))
            or regex_error(settings.get("tags") or {}, "tags"))


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    if not config.tags:
        return []
    tags = tuple(config.tags)
    patterns = pattern_set(tuple(config.tags.values()))

    def find(text: str) -> frozenset[str]:
        return frozenset(tags[i] for i in patterns.matching(text))

    found = union_over_texts(ctx.request, config.scope, config.max_chars,
                             ("regex", patterns.key, tags), find)
    return [tag for tag in tags if tag in found]
