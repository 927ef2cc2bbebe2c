"""redact: masks e-mail addresses, phone numbers and secret-looking tokens before the
provider sees them, and (``restore = true``) puts them back in the answer, streamed or not.

    [plugins.redact]
    kinds = ["email", "phone", "secret"]
    restore = true
    unreadable = "pass"   # or "reject": refuse what it cannot read (images, PDFs...)

The provider sees ``[EMAIL_1]``, ``[PHONE_1]``, ``[SECRET_1]``...; one value keeps one
placeholder throughout a request. The patterns run on RE2 (linear time), all kinds in one
pass, and what a text holds is remembered by content (``proxy.memo``): an agent's history,
resent every turn, is scanned once. Text documents are masked too; thinking is not (the
provider signed it, and would refuse it changed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal

import msgspec

from proxy import (
    DROP,
    DocumentPart,
    Reject,
    RequestContext,
    Response,
    StreamEvent,
    TextDelta,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    hookimpl,
)
from proxy.memo import memo
from proxy.settings import settings_as, settings_error
from proxy.textmatch import regex

Kind = Literal["email", "phone", "secret"]


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    kinds: list[Kind] = msgspec.field(default_factory=lambda: ["email", "phone", "secret"])
    restore: bool = True
    # Images, binary documents, redacted thinking and blocks hookproxy has no type for
    # hold no text to mask: let them through, or refuse the request.
    unreadable: Literal["pass", "reject"] = "pass"


# Secrets first: where two kinds could match at one place, the secret wins. These run on
# RE2, in time linear in the text whatever it holds.
PATTERNS: dict[str, str] = {
    "secret": r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}"
              r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[baprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}"
              r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
    "email": r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b",
    # 9 to 15 digits, with separators, not inside a longer word or number.
    "phone": r"(?:\B\+|\b)(?:\d[\s().-]{0,2}){8,14}\d\b",
}
PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|SECRET)_\d+\]")
_LONGEST_PLACEHOLDER = 16
Finding = tuple[int, int, str]  # start, end, kind


@lru_cache(maxsize=8)
def _finder(kinds: tuple[str, ...]) -> Callable[[str], tuple[Finding, ...]]:
    """What finds the values of ``kinds`` in a text: one linear pass per kind, merged
    (where two overlap, the kind listed first wins, as secrets before e-mails). One
    alternation of all kinds would not stay linear: a branch that lives on past another
    branch's match makes the engine rescan."""
    patterns = [(kind, regex(PATTERNS[kind])) for kind in kinds]

    def find(text: str) -> tuple[Finding, ...]:
        found: list[Finding] = []
        for kind, pattern in patterns:
            found.extend((m.start(), m.end(), kind) for m in pattern.finditer(text))
        if len(patterns) == 1 or len(found) < 2:
            return tuple(found)
        rank = {kind: i for i, (kind, _) in enumerate(patterns)}
        found.sort(key=lambda f: (f[0], rank[f[2]]))
        kept: list[Finding] = []
        for finding in found:
            if kept and finding[0] < kept[-1][1]:
                if rank[finding[2]] < rank[kept[-1][2]]:
                    kept[-1] = finding  # overlapping: the earlier-listed kind wins
                continue
            kept.append(finding)
        return tuple(kept)

    return find


class _Masker:
    def __init__(self, kinds: list[Kind]) -> None:
        self.kinds = tuple(k for k in PATTERNS if k in kinds)
        self.find = _finder(self.kinds)
        self.originals: dict[str, str] = {}  # placeholder -> original
        self.placeholders: dict[str, str] = {}  # original -> placeholder
        self.counts: dict[str, int] = {}

    def mask(self, text: str) -> str:
        # What a text holds is remembered by content: a history that comes back on the
        # next turn is not scanned again, only numbered.
        findings = memo.get_or_compute(("redact", self.kinds), text, self.find)
        if not findings:
            return text
        pieces = []
        position = 0
        for start, end, kind in findings:
            pieces.append(text[position:start])
            pieces.append(self._placeholder(kind, text[start:end]))
            position = end
        pieces.append(text[position:])
        return "".join(pieces)

    def _placeholder(self, kind: str, value: str) -> str:
        placeholder = self.placeholders.get(value)
        if placeholder is None:
            count = self.counts[kind] = self.counts.get(kind, 0) + 1
            placeholder = f"[{kind.upper()}_{count}]"
            self.placeholders[value] = placeholder
            self.originals[placeholder] = value
        return placeholder

    def restore(self, text: str) -> str:
        if "[" not in text:
            return text
        return PLACEHOLDER.sub(lambda m: self.originals.get(m.group(), m.group()), text)


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    masker = _Masker(config.kinds)
    request = ctx.request
    for part in request.system:
        part.text = masker.mask(part.text)
    for message in request.messages:
        for item in message.content:
            if isinstance(item, TextPart):
                item.text = masker.mask(item.text)
            elif isinstance(item, ToolCallPart):
                item.arguments = masker.mask(item.arguments)
            elif isinstance(item, ToolResultPart):
                for inner in item.content:
                    if isinstance(inner, TextPart | DocumentPart):
                        inner.text = masker.mask(inner.text)
            elif isinstance(item, DocumentPart):
                item.text = masker.mask(item.text)
            # Thinking is signed by the provider: changed, it would be refused.
    if config.unreadable == "reject":
        unreadable = request.unreadable()
        if unreadable:
            raise Reject(400, "redact cannot mask what this request holds: "
                              f"{', '.join(unreadable[:5])}", code="content_policy")
    if masker.originals:
        ctx.scratch["redact"] = masker
        ctx.scratch["redacted"] = len(masker.originals)


def _masker(ctx: RequestContext, settings: dict[str, Any]) -> _Masker | None:
    masker: _Masker | None = ctx.scratch.get("redact")
    if masker is None or not settings_as(settings, Settings).restore:
        return None
    return masker


@hookimpl(trylast=True)
def post_response(ctx: RequestContext, response: Response, settings: dict[str, Any]) -> None:
    masker = _masker(ctx, settings)
    if masker is None or ctx.stream:
        return  # a stream was restored chunk by chunk
    for part in response.content:
        if isinstance(part, TextPart):
            part.text = masker.restore(part.text)
        elif isinstance(part, ToolCallPart):
            part.arguments = masker.restore(part.arguments)


@hookimpl(trylast=True)
def stream_chunk(ctx: RequestContext, event: StreamEvent, settings: dict[str, Any]) -> Any:
    masker = _masker(ctx, settings)
    if masker is None:
        return None
    # A placeholder may be split across chunks: hold back an unfinished "[..." until the
    # next chunk completes it.
    carry: tuple[int, str] | None = ctx.scratch.get("redact_carry")
    if isinstance(event, TextDelta):
        text = (carry[1] if carry else "") + event.text
        cut = text.rfind("[")
        held = ""
        if cut >= 0 and "]" not in text[cut:] and len(text) - cut < _LONGEST_PLACEHOLDER:
            text, held = text[:cut], text[cut:]
        ctx.scratch["redact_carry"] = (event.index, held) if held else None
        return TextDelta(index=event.index, text=masker.restore(text)) if text else DROP
    if carry:
        ctx.scratch["redact_carry"] = None
        return [TextDelta(index=carry[0], text=masker.restore(carry[1])), event]
    return None
