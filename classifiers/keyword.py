"""keyword: tags a request when its text contains any of a tag's words or phrases
(case-insensitive, whole words: "art" does not match "start").

    [classifiers.keyword]
    scope = "messages"        # "last" user message, all "messages", or "all" incl. system
    max_chars = 100000        # the newest text scanned, at most
    [classifiers.keyword.tags]
    billing = ["invoice", "refund", "credit card"]
    legal = ["contract", "GDPR"]

All the words are found in one pass over the text (an Aho-Corasick automaton, built once
per table), however many there are; a word may be up to 200 characters long.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from classifiers.scope import MAX_CHARS, Scope, max_chars_problem, union_over_texts
from proxy import RequestContext, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error
from proxy.textmatch import keyword_problem, keyword_table


class Settings(msgspec.Struct, forbid_unknown_fields=True, dict=True):
    tags: dict[str, list[str]] = {}
    scope: Scope = "messages"
    max_chars: int = MAX_CHARS

    @functools.cached_property
    def table_key(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        # Made once per settings (settings_as keeps them per settings dict), not per
        # request. The table itself stays in keyword_table's bounded cache alone.
        return tuple((tag, tuple(words)) for tag, words in self.tags.items())


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    problem = settings_error(settings, Settings) or max_chars_problem(settings.get("max_chars"))
    if problem:
        return problem
    for tag, words in (settings.get("tags") or {}).items():
        problem = keyword_problem(words)
        if problem:
            return f"tags.{tag}: {problem}"
    return None


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    table = keyword_table(config.table_key)
    if not table.tags:
        return []
    found = union_over_texts(ctx.request, config.scope, config.max_chars,
                             ("keyword", table.key), table.tags_in)
    return [tag for tag in table.tags if tag in found]
