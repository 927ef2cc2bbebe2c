"""code: tags a request whose text contains code, or asks for some.

    [classifiers.code]
    tag = "code"
    scope = "messages"
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from classifiers.scope import Scope, scoped_text
from proxy import RequestContext, hookimpl
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    tag: str = "code"
    scope: Scope = "messages"


# Text that is code: a fence, a traceback, or lines shaped like statements.
_CONTAINS = re.compile(
    r"```|Traceback \(most recent call last\)"
    r"|^\s*(?:def|class|import|from\s+\S+\s+import|function|const|let|var|public|private"
    r"|#include|package|fn|func|impl|struct|return|for\s*\(|if\s*\(|while\s*\()\b"
    r"|\bSELECT\b[\s\S]+?\bFROM\b|=>|\);\s*$|\{\s*$|^\s*\}|^\s*<\w+[^>]*>\s*$",
    re.MULTILINE)
# Asking for code: programming verbs next to programming nouns, or a language's name.
_ASKS = re.compile(
    r"(?i)\b(?:write|implement|refactor|debug|fix|optimi[sz]e|generate|review|convert|"
    r"translate|explain)\b[^.?!\n]{0,40}\b(?:code|function|script|program|class|method|"
    r"query|regex|regular expression|algorithm|bug|unit tests?|api|endpoint|snippet)\b"
    r"|\b(?:python|javascript|typescript|rust|golang|java|kotlin|c\+\+|c#|ruby|php|swift|"
    r"bash|shell script|sql|haskell|scala)\b")


def looks_like_code(text: str) -> bool:
    return bool(_CONTAINS.search(text) or _ASKS.search(text))


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    return [config.tag] if looks_like_code(scoped_text(ctx.request, config.scope)) else []
