"""code: tags a request whose text contains code, or asks for some.

    [classifiers.code]
    tag = "code"
    scope = "messages"
    max_chars = 100000     # the newest text scanned, at most

Its patterns run on RE2, in time linear in the text (no backtracking).
"""

from __future__ import annotations

from typing import Any

import msgspec

from classifiers.scope import MAX_CHARS, Scope, any_text, max_chars_problem
from proxy import RequestContext, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.settings import settings_as, settings_error
from proxy.textmatch import regex


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    tag: str = "code"
    scope: Scope = "messages"
    max_chars: int = MAX_CHARS


# Text that is code: a fence, a traceback, or lines shaped like statements.
_CONTAINS = (
    r"```|Traceback \(most recent call last\)"
    r"|(?m:^[ \t]*(?:def|class|import|from[ \t]+\S+[ \t]+import|function|const|let|var|public"
    r"|private|#include|package|fn|func|impl|struct|return|for[ \t]*\(|if[ \t]*\("
    r"|while[ \t]*\()\b)"
    r"|\bSELECT\b[\s\S]+?\bFROM\b|=>|(?m:\);[ \t]*$)|(?m:\{[ \t]*$)|(?m:^[ \t]*\})"
    r"|(?m:^[ \t]*<\w+[^>\n]*>[ \t]*$)")
# Asking for code: programming verbs next to programming nouns, or a language's name.
_ASKS = (
    r"(?i:\b(?:write|implement|refactor|debug|fix|optimi[sz]e|generate|review|convert|"
    r"translate|explain)\b[^.?!\n]{0,40}\b(?:code|function|script|program|class|method|"
    r"query|regex|regular expression|algorithm|bug|unit tests?|api|endpoint|snippet)\b"
    r"|\b(?:python|javascript|typescript|rust|golang|java|kotlin|c\+\+|c#|ruby|php|swift|"
    r"bash|shell script|sql|haskell|scala)\b)")
_CODE = regex(f"{_CONTAINS}|{_ASKS}")


def looks_like_code(text: str) -> bool:
    return _CODE.search(text) is not None


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings) or max_chars_problem(settings.get("max_chars"))


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    found = any_text(ctx.request, config.scope, config.max_chars, "code", looks_like_code)
    return [config.tag] if found else []
