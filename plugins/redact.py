"""redact: masks e-mail addresses, phone numbers and secret-looking tokens before the
provider sees them, and (``restore = true``) puts them back in the answer, streamed or not.

    [plugins.redact]
    kinds = ["email", "phone", "secret"]
    restore = true
    unreadable = "pass"   # or "reject": refuse what it cannot read (images, PDFs...)

The provider sees ``[EMAIL_1]``, ``[PHONE_1]``, ``[SECRET_1]``...; one value keeps one
placeholder throughout a request. Each message is read as the one text the provider reads
(its parts joined as content_guard joins them), so a value split over two parts is found;
each piece of it, in every part it covers, becomes the placeholder, and a run of one
placeholder is restored as the value once. The patterns run on RE2 (linear time), and
what a text holds is remembered by content (``proxy.memo``): an agent's history, resent
every turn, is scanned once. Text documents and tool results are masked too; thinking is
not (the provider signed it, and would refuse it changed).

JSON is masked inside its strings only, so it stays JSON: the assistant's tool-call
arguments, the tool definitions' parameter schemas (descriptions, defaults, enums...) and
the structured-output schema (``response_format``, the Responses API's ``text.format``,
Anthropic's ``output_config.format``). Tool-call arguments that are not JSON are read
with their escapes undone and masked where the value stands, escapes and all (they stay
as invalid as they came). A tool's or a schema's description is masked as text; its name
is not (the model calls it, or files its answer, by it). Tool definitions and schemas
come back every turn: that they hold nothing is remembered by their content. The
top-level ``user`` and ``safety_identifier`` (OpenAI) or ``metadata.user_id``
(Anthropic), and a message's ``name`` (OpenAI Chat Completions), are masked as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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
    ToolCallDelta,
    ToolCallPart,
    hookimpl,
    reports_changes,
)
from proxy.canonical import (
    MESSAGE_JOIN,
    SYSTEM_JOIN,
    Message,
    Request,
    Tool,
    content_key,
    joined_text,
)
from proxy.dispatch import no_plugin_context
from proxy.jsontext import Unescaped, is_json, readable, replace_strings, strings_of
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
# Text each kind's match must hold: where none is in a text (a substring search, far
# faster than the pattern), the pattern need not run over it.
NEEDLES: dict[str, tuple[str, ...]] = {
    "secret": ("sk-", "AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "AIza", "eyJ"),
    "email": ("@",),
    "phone": (),  # digits: no cheaper test than the pattern's own
}
# A placeholder, and as many more of the same right after it.
PLACEHOLDER = re.compile(r"(\[(?:EMAIL|PHONE|SECRET)_\d+\])\1*")
_AT_END = re.compile(r"\[(?:EMAIL|PHONE|SECRET)_\d+\]\Z")
_LONGEST_PLACEHOLDER = 16
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
Finding = tuple[int, int, str]  # start, end, kind


@lru_cache(maxsize=8)
def _finder(kinds: tuple[str, ...]) -> Callable[[str], tuple[Finding, ...]]:
    """What finds the values of ``kinds`` in a text: one linear pass per kind, merged
    (where two overlap, the kind listed first wins, as secrets before e-mails). One
    alternation of all kinds would not stay linear: a branch that lives on past another
    branch's match makes the engine rescan."""
    patterns = [(kind, regex(PATTERNS[kind])) for kind in kinds]
    needles = [NEEDLES[kind] for kind in kinds]

    def find(text: str) -> tuple[Finding, ...]:
        found: list[Finding] = []
        for (kind, pattern), needed in zip(patterns, needles, strict=True):
            if needed and not any(needle in text for needle in needed):
                continue
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


@lru_cache(maxsize=8)
def _plan(kinds: tuple[str, ...]) -> tuple[tuple[str, ...], Callable[[str], tuple[Finding, ...]],
                                          tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]]:
    """For the ``kinds`` setting: the kinds in the order they win, their finder, and the
    names of what ``proxy.memo`` keeps for a text and for a message."""
    ordered = tuple(k for k in PATTERNS if k in kinds)
    return ordered, _finder(ordered), ("redact", ordered), ("redact-clean", ordered)


class _Masker:
    def __init__(self, kinds: Sequence[Kind]) -> None:
        self.kinds, self.find, self.found_in, self.clean = _plan(tuple(kinds))
        self.originals: dict[str, str] = {}  # placeholder -> original
        self.placeholders: dict[str, str] = {}  # original -> placeholder
        self.counts: dict[str, int] = {}

    def _findings(self, text: str) -> tuple[Finding, ...]:
        # What a text holds is remembered by content: a history that comes back on the
        # next turn is not scanned again, only numbered.
        return memo.get_or_compute(self.found_in, text, self.find)

    def mask(self, text: str, read: Unescaped | None = None) -> str:
        """``text`` with each value replaced by its placeholder; ``text`` itself if it
        holds none. With ``read`` (``text`` with its escapes undone), values are found in
        what it reads and replaced where they stand in ``text``, escapes and all."""
        findings = self._findings(read.text if read else text)
        if not findings:
            return text
        pieces = []
        position = 0
        for start, end, kind in findings:
            value = read.text[start:end] if read else text[start:end]
            if read:
                start, end = read.span(start, end)
            pieces.append(text[position:start])
            pieces.append(self._placeholder(kind, value))
            position = end
        pieces.append(text[position:])
        return "".join(pieces)

    def holds_nothing(self, message: Message) -> bool:
        """Whether ``message`` holds no value to mask."""
        return not self._findings(joined_text(message.text_parts())) and not any(
            self._findings(readable(item.arguments)) for item in message.content
            if isinstance(item, ToolCallPart)) and not (
            message.name and self._findings(message.name))

    def mask_message(self, message: Message) -> bool:
        """Masks what ``message`` holds; whether it changed."""
        changed = self.mask_parts(message.text_parts())
        for item in message.content:
            if isinstance(item, ToolCallPart):
                masked = self.mask_json(item.arguments)
                if masked is not item.arguments:
                    item.arguments = masked
                    changed = True
        if message.name:
            name = self.mask(message.name)
            if name is not message.name:
                message.name, changed = name, True
        return changed

    def mask_json(self, text: str) -> str:
        """``text`` masked inside its strings if it is JSON (it stays JSON), else as text
        with its escapes undone; ``text`` itself if nothing was found."""
        if is_json(text):
            return replace_strings(text, self.mask)
        return self.mask(text, Unescaped(text)) if "\\" in text else self.mask(text)

    def mask_tools(self, tools: list[Tool]) -> bool:
        """Masks the tool definitions' descriptions, and the strings of their parameter
        schemas and other settings; whether anything changed."""
        changed = False
        for tool in tools:
            description = self.mask(tool.description)
            if description is not tool.description:
                tool.description, changed = description, True
            for field in ("parameters", "extra"):
                value = getattr(tool, field)
                masked = self.mask_value(value)
                if masked is not value:
                    setattr(tool, field, masked)
                    changed = True
        return changed

    def mask_format(self, output: dict[str, Any]) -> dict[str, Any]:
        """A structured-output format (``Request.output_formats``) with its description
        masked as text and the strings of its schema masked; ``output`` itself if
        nothing changed (it is never changed in place: it is the client's own)."""
        masked = dict(output)
        description = output.get("description")
        if isinstance(description, str):
            masked["description"] = self.mask(description)
        if "schema" in output:
            masked["schema"] = self.mask_value(output["schema"])
        return output if masked == output else masked

    def mask_value(self, value: Any) -> Any:
        """A JSON value with its strings (keys too) masked: ``value`` itself if nothing
        changed, else a new value."""
        if not value:
            return value
        text = _encode(value).decode()
        masked = replace_strings(text, self.mask)
        return value if masked is text else _decode(masked)

    def mask_parts(self, parts: Sequence[TextPart | DocumentPart],
                   separator: str = MESSAGE_JOIN) -> bool:
        """Masks the values in the one text ``parts`` make for the provider (joined by
        ``separator``), so that a value split over two parts is found. Each piece of a
        value, in every part it covers, becomes the value's placeholder: the provider
        gets it neither whole nor in pieces, and no part is left empty. Returns whether
        anything was masked."""
        if not parts:
            return False
        text = joined_text(parts, separator)
        findings = self._findings(text)
        if not findings:
            return False
        values = [(start, end, self._placeholder(kind, text[start:end]))
                  for start, end, kind in findings]
        first = 0  # the first value that may reach into this part
        offset = 0  # where this part begins in ``text``
        for part in parts:
            part_end = offset + len(part.text)
            pieces: list[str] = []
            position = offset
            i = first
            while i < len(values) and values[i][0] < part_end:
                start, end, placeholder = values[i]
                if max(start, offset) < min(end, part_end):
                    pieces.append(text[position:max(start, offset)])
                    pieces.append(placeholder)
                    position = min(end, part_end)
                if end > part_end:
                    break  # it goes on into the next part
                i += 1
            first = i
            if pieces:
                pieces.append(text[position:part_end])
                part.text = "".join(pieces)
            offset = part_end + len(separator)
        return True

    def _placeholder(self, kind: str, value: str) -> str:
        placeholder = self.placeholders.get(value)
        if placeholder is None:
            count = self.counts[kind] = self.counts.get(kind, 0) + 1
            placeholder = f"[{kind.upper()}_{count}]"
            self.placeholders[value] = placeholder
            self.originals[placeholder] = value
        return placeholder

    def restore(self, text: str, after: str = "") -> str:
        """``text`` with the originals back. A run of one placeholder stands for its value
        once: a value split over parts went out as one placeholder per part. ``after``:
        the placeholder the text before this one (an earlier chunk) ended with."""
        if after and text.startswith(after):
            text = text[len(after) * _run_length(text, after):]
        if "[" not in text:
            return text
        return PLACEHOLDER.sub(lambda m: self.originals.get(m.group(1), m.group()), text)


def _mask_tools(masker: _Masker, request: Request) -> bool:
    """Masks the tool definitions, unless their content is known to hold nothing."""
    return not _holds_nothing(masker, "redact-tools-clean", request.tools) and \
        masker.mask_tools(request.tools)


def _holds_nothing(masker: _Masker, what: str, value: Any) -> bool:
    """Whether the strings of ``value`` (tool definitions, output formats) hold nothing to
    mask, remembered by its content: they come back whole every turn."""
    return not value or memo.get_or_compute(
        (what, masker.kinds), _encode(value),
        lambda text: not masker.find(strings_of(text.decode())))


def _mask_formats(masker: _Masker, request: Request) -> bool:
    """Masks the structured-output formats the request asks for (``response_format``,
    Anthropic's ``output_config.format``...), each put back as a new object."""
    formats = request.output_formats()
    if _holds_nothing(masker, "redact-formats-clean", formats):
        return False
    changed = False
    for output in formats:
        masked = masker.mask_format(output)
        if masked is not output:
            request.replace_output_format(output, masked)
            changed = True
    return changed


def _run_length(text: str, piece: str) -> int:
    """How many times ``text`` begins with ``piece`` in a row."""
    count = 0
    while text.startswith(piece, count * len(piece)):
        count += 1
    return count


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings)


@hookimpl(trylast=True)
@reports_changes
@no_plugin_context
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    masker = _Masker(config.kinds)
    request = ctx.request
    # Tool definitions first, as providers put them before the rest of the prompt: each
    # value keeps the placeholder it had on the turn before.
    if _mask_tools(masker, request):
        ctx.changed()
    if _mask_formats(masker, request):
        ctx.changed()
    # The text each message (and the system prompt) makes for the provider, its parts
    # joined as the provider reads them: the text content_guard checks too.
    if masker.mask_parts(request.system, SYSTEM_JOIN):
        ctx.changed()
    # A message known to hold nothing to mask (by its content_key: no text is even joined
    # or hashed for it) is passed over.
    what = masker.clean
    messages = request.messages
    keys = [content_key(message) for message in messages]
    known = iter(memo.lookup_all(what, [key for key in keys if key is not None]))
    for message, key in zip(messages, keys, strict=True):
        clean = next(known) if key is not None else False
        if clean is None and key is not None:
            clean = masker.holds_nothing(message)
            memo.put(what, key, clean)
        if not clean and masker.mask_message(message):
            ctx.changed(message)
        # Thinking is signed by the provider: changed, it would be refused.
    if request.user:
        user = masker.mask(request.user)
        if user is not request.user:
            request.user = user
            ctx.changed()
    # OpenAI's successor to ``user``: kept in ``extra``, masked as ``user`` is.
    safety_identifier = request.extra.get("safety_identifier")
    if isinstance(safety_identifier, str):
        masked = masker.mask(safety_identifier)
        if masked is not safety_identifier:
            request.extra["safety_identifier"] = masked
            ctx.changed()
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
@reports_changes
@no_plugin_context
def post_response(ctx: RequestContext, response: Response, settings: dict[str, Any]) -> None:
    if "redact" not in ctx.scratch:
        return  # nothing was masked (most requests)
    masker = _masker(ctx, settings)
    if masker is None or ctx.stream:
        return  # a stream was restored chunk by chunk
    for part in response.content:
        if isinstance(part, TextPart):
            restored = masker.restore(part.text)
            if restored != part.text:
                part.text = restored
                ctx.changed()
        elif isinstance(part, ToolCallPart):
            restored = masker.restore(part.arguments)
            if restored != part.arguments:
                part.arguments = restored
                ctx.changed()


class _StreamRestore:
    """What restoring a stream carries from one chunk to the next, per block and choice:
    an unfinished "[..." held back until the next chunk completes it, and the
    placeholder the text sent so far ended with."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], tuple[TextDelta | ToolCallDelta, str]] = {}
        self.after: dict[tuple[int, int], str] = {}

    def delta(self, masker: _Masker, event: TextDelta | ToolCallDelta) -> list[StreamEvent]:
        key = (event.index, event.choice)
        piece = _piece(event)
        held = self.held.pop(key, None)
        text = held[1] + piece if held else piece
        cut = text.rfind("[")
        if cut >= 0 and "]" not in text[cut:] and len(text) - cut < _LONGEST_PLACEHOLDER:
            text, self.held[key] = text[:cut], (event, text[cut:])
        restored = self.restore(masker, key, text)
        if restored == piece and not held and key not in self.held:
            return [event]
        return [_with_piece(event, restored)] if restored else []

    def restore(self, masker: _Masker, key: tuple[int, int], text: str) -> str:
        restored = masker.restore(text, self.after.get(key, ""))
        end = _AT_END.search(text, max(0, len(text) - _LONGEST_PLACEHOLDER))
        self.after[key] = end.group() if end else ""
        return restored

    def flush(self, masker: _Masker) -> list[StreamEvent]:
        """What is held back, restored as it is: the block or the stream is ending."""
        held, self.held = self.held, {}
        return [_with_piece(event, self.restore(masker, key, text))
                for key, (event, text) in held.items()]


def _piece(event: TextDelta | ToolCallDelta) -> str:
    return event.text if isinstance(event, TextDelta) else event.arguments


def _with_piece(event: TextDelta | ToolCallDelta, piece: str) -> StreamEvent:
    if isinstance(event, TextDelta):
        return msgspec.structs.replace(event, text=piece)
    return msgspec.structs.replace(event, arguments=piece)


@hookimpl(trylast=True)
@reports_changes  # returns new events, never changes one in place
@no_plugin_context
def stream_chunk(ctx: RequestContext, event: StreamEvent, settings: dict[str, Any]) -> Any:
    masker = _masker(ctx, settings)
    if masker is None:
        return None
    state: _StreamRestore = ctx.scratch.setdefault("redact_stream", _StreamRestore())
    if isinstance(event, TextDelta | ToolCallDelta):
        produced = state.delta(masker, event)
    elif state.held:
        produced = [*state.flush(masker), event]
    else:
        return None
    if len(produced) == 1 and produced[0] is event:
        return None
    return produced or DROP
