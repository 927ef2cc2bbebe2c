"""The canonical request, response and stream-event types every stage works on.

Each wire format (``proxy.formats.openai``, ``proxy.formats.anthropic``) converts to and
from these. ``extra`` fields hold what a wire format carried that the proxy does not model;
they are written back only when the request goes to a provider of the same format, so a
vendor parameter added last week still reaches it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import msgspec

# "system": a system (or developer) message in the middle of the conversation; the
# leading system prompt is ``Request.system``.
Role = Literal["user", "assistant", "system"]
# Canonical finish reasons; each wire format maps its own names onto these.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class TextPart(msgspec.Struct, tag="text", omit_defaults=True):
    text: str
    extra: dict[str, Any] = {}


class ImagePart(msgspec.Struct, tag="image", omit_defaults=True):
    """An image given either by URL or inline as base64 ``data`` with its ``media_type``."""

    url: str = ""
    media_type: str = ""
    data: str = ""
    extra: dict[str, Any] = {}


class DocumentPart(msgspec.Struct, tag="document", omit_defaults=True):
    """A document (a PDF, say): inline as base64 ``data`` with its ``media_type``, by
    ``url``, or as plain ``text``. ``name`` is its title or file name."""

    url: str = ""
    media_type: str = ""
    data: str = ""
    text: str = ""
    name: str = ""
    extra: dict[str, Any] = {}


class ThinkingPart(msgspec.Struct, tag="thinking", omit_defaults=True):
    """The model's reasoning, with the provider's ``signature`` that vouches for it (a
    client sends it back unchanged in the next turn)."""

    thinking: str
    signature: str = ""
    extra: dict[str, Any] = {}


class RedactedThinkingPart(msgspec.Struct, tag="redacted_thinking", omit_defaults=True):
    """Reasoning the provider encrypted: ``data`` goes back as it came."""

    data: str
    extra: dict[str, Any] = {}


class ToolCallPart(msgspec.Struct, tag="tool_call", omit_defaults=True):
    """A call the assistant makes; ``arguments`` is the JSON text of the arguments."""

    id: str
    name: str
    arguments: str = "{}"
    extra: dict[str, Any] = {}


class OpaquePart(msgspec.Struct, tag="opaque", omit_defaults=True):
    """A block the canonical model has no type for (a server tool's call or result, an
    audio part, a block type added last week): ``data`` is its JSON as it came in wire
    format ``format``. It goes back unchanged to a provider (or client) of that format;
    another format refuses it with a 400 naming ``kind`` (its type there)."""

    format: str
    kind: str
    data: dict[str, Any] = {}


class ToolResultPart(msgspec.Struct, tag="tool_result", omit_defaults=True):
    """The result of a tool call, sent back in a user turn."""

    tool_call_id: str
    content: list[TextPart | ImagePart | DocumentPart | OpaquePart] = []
    is_error: bool = False
    extra: dict[str, Any] = {}


Part = (TextPart | ImagePart | DocumentPart | ThinkingPart | RedactedThinkingPart
        | ToolCallPart | ToolResultPart | OpaquePart)


class Message(msgspec.Struct, omit_defaults=True, dict=True):
    """One turn. A decoded message remembers the wire JSON it came from (``wire``, not a
    field): sent back to the same format unchanged, it goes out as it came."""

    role: Role
    content: list[Part]
    name: str | None = None
    extra: dict[str, Any] = {}

    @property
    def text(self) -> str:
        content = self.content
        if len(content) == 1:  # most messages
            part = content[0]
            return part.text if isinstance(part, TextPart) else ""
        return "".join(p.text for p in content if isinstance(p, TextPart))

    def text_parts(self) -> list[TextPart | DocumentPart]:
        """The parts holding the text this message holds, in the order a provider reads
        them: text parts, the text of tool results, text documents. ``joined_text`` makes
        them the one text a provider reads."""
        parts: list[TextPart | DocumentPart] = []
        for part in self.content:
            for item in part.content if isinstance(part, ToolResultPart) else (part,):
                if isinstance(item, TextPart) or (isinstance(item, DocumentPart) and item.text):
                    parts.append(item)
        return parts


# How a provider reads the text of several parts as one: a message's parts run on with
# nothing between them (the OpenAI format sends plain parts to a provider as one string),
# the system prompt's blocks are joined by a blank line. Content checks read exactly this.
MESSAGE_JOIN = ""
SYSTEM_JOIN = "\n\n"


def joined_text(parts: Sequence[TextPart | DocumentPart], separator: str = MESSAGE_JOIN) -> str:
    """The text of ``parts`` as a provider reads it (``separator``: see ``MESSAGE_JOIN``)."""
    return parts[0].text if len(parts) == 1 else separator.join(p.text for p in parts)


class Tool(msgspec.Struct, omit_defaults=True):
    """A function the model may call. ``type`` names a provider's built-in (server) tool
    instead, such as Anthropic's ``web_search_20250305``: ``format`` is that provider's wire
    format, ``extra`` its settings; it cannot go to another format."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    type: str = ""
    format: str = ""


class ToolChoice(msgspec.Struct, omit_defaults=True):
    """``auto``, ``none``, ``required`` (any tool) or ``tool`` (the one named)."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None
    extra: dict[str, Any] = {}


class Request(msgspec.Struct, omit_defaults=True, dict=True):
    """The request. A decoded request remembers its wire JSON (``wire``, not a field), so
    that what did not change goes back to a provider of the same format as it came."""

    model: str
    messages: list[Message]
    system: list[TextPart] = []
    tools: list[Tool] = []
    tool_choice: ToolChoice | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = []
    # False: at most one tool call per turn (OpenAI parallel_tool_calls, Anthropic
    # tool_choice.disable_parallel_tool_use); None: the provider's default.
    parallel_tool_calls: bool | None = None
    stream: bool = False
    # OpenAI's stream_options.include_usage: send a usage chunk at the end of a stream.
    stream_usage: bool = False
    # Ask for a JSON answer: {"type": "json_object"} or {"type": "json_schema", ...}.
    response_format: dict[str, Any] | None = None
    user: str | None = None
    extra: dict[str, Any] = {}
    # Vendor headers the client sent (anthropic-beta, anthropic-version, openai-organization,
    # openai-project...), never credentials: they go to a provider of the client's format.
    headers: dict[str, str] = {}

    @property
    def system_text(self) -> str:
        return joined_text(self.system, SYSTEM_JOIN)

    def message_texts(self) -> Iterator[str]:
        """Each message's text, newest first: its text parts joined as the provider joins
        them, then its tool results' text; then the system prompt. Empty ones are left
        out. Per-message work iterates this, and can stop early."""
        for message in reversed(self.messages):
            text = joined_text(message.text_parts())
            if text:
                yield text
        if self.system:
            yield self.system_text

    def output_formats(self) -> list[dict[str, Any]]:
        """The structured-output formats the request asks for, each an object whose
        ``description`` and ``schema`` the model reads as it reads a tool's: Chat
        Completions' ``response_format.json_schema`` (the Responses API's
        ``text.format`` is decoded to it) and, kept in ``extra``, Anthropic's
        ``output_config.format`` and its beta ``output_format``."""
        found = []
        for outer, key in self._output_format_places():
            inner = outer.get(key) if isinstance(outer, dict) else None
            if isinstance(inner, dict):
                found.append(inner)
        return found

    def replace_output_format(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Puts ``new`` where the output format ``old`` (from ``output_formats``) is; what
        holds it is copied, not changed in place (it is the client's decoded JSON)."""
        if self.response_format and self.response_format.get("json_schema") is old:
            self.response_format = {**self.response_format, "json_schema": new}
        output = self.extra.get("output_config")
        if isinstance(output, dict) and output.get("format") is old:
            self.extra["output_config"] = {**output, "format": new}
        if self.extra.get("output_format") is old:
            self.extra["output_format"] = new

    def _output_format_places(self) -> tuple[tuple[Any, str], ...]:
        return ((self.response_format, "json_schema"),
                (self.extra.get("output_config"), "format"), (self.extra, "output_format"))

    def unreadable(self) -> list[str]:
        """What in the messages holds content that is not text a plugin can read or
        change: images, binary or linked documents, redacted thinking, opaque blocks (by
        their type). Content checks decide with this what to do about them."""
        found: dict[str, None] = {}
        for message in self.messages:
            for part in message.content:
                inner = part.content if isinstance(part, ToolResultPart) else [part]
                for item in inner:
                    if isinstance(item, ImagePart):
                        found["image"] = None
                    elif isinstance(item, DocumentPart) and not item.text:
                        found[f"document ({item.media_type or 'by URL'})"] = None
                    elif isinstance(item, RedactedThinkingPart):
                        found["redacted_thinking"] = None
                    elif isinstance(item, OpaquePart):
                        found[item.kind] = None
        return list(found)

    def prompt_text(self) -> str:
        """All text of the system prompt and the messages, for matching and estimates."""
        texts = [p.text for p in self.system]
        for message in self.messages:
            texts.extend(p.text for p in message.text_parts())
        return "\n".join(texts)


def remember_wire(item: Message | Request, wire: Any, printed: bytes | None = None) -> None:
    """Notes the wire JSON ``item`` was decoded from (not a field: never encoded or
    compared, and gone from a copy); for a message, also its ``fingerprint`` as decoded
    (given, or made here), which ``unchanged`` compares with."""
    item.__dict__["wire"] = wire
    if isinstance(item, Message):
        item.__dict__["printed"] = printed if printed is not None else fingerprint(item)


def wire_of(item: Message | Request) -> Any:
    """The wire JSON ``item`` was decoded from, or None."""
    return item.__dict__.get("wire")


def unchanged(message: Message) -> bool:
    """Whether ``message`` is still what it was decoded as (so its wire JSON can go back
    as it came): one encode of the message, no decode."""
    return content_key(message) is not None


# Set in a request's ``__dict__`` while classifiers run: what they share (their scoped
# texts, see classifiers.scope) for as long as the request cannot change.
CLASSIFYING = "classifying"


def content_key(message: Message) -> bytes | None:
    """A key for work that depends only on what ``message`` holds (a redaction's or a
    classifier's verdict): its canonical form as decoded, while it is unchanged; None for a
    message a plugin changed or that was not decoded from a request. A message an agent
    resends is the very bytes object ``proxy.memo`` keeps, whose hash is made once: a memo
    lookup with it costs the same for a 50 KB message as for a short one.

    Whether the message is unchanged is known without looking while every hook that ran
    since it was last looked at reports its changes (``vouch``); otherwise one encode of
    the message tells."""
    facts = message.__dict__
    printed = facts.get("printed")
    if printed is None:
        return None
    if vouched_for(message):
        return printed
    vouched = facts.get("vouched")
    if printed != fingerprint(message):
        return None
    if vouched is not None:  # looked at: unchanged until a hook that does not report runs
        facts["vouched"] = (vouched[0], vouched[0][0])
    return printed


def vouch(request: Request) -> None:
    """Starts keeping count, for ``content_key``, of the hooks that may have changed
    ``request``'s messages without saying so (``distrust``): until one runs, a message no
    hook reported changed (``forget_printed``) is known to be as it was decoded."""
    epoch = [0]
    request.__dict__["epoch"] = epoch
    fresh = (epoch, 0)
    for message in request.messages:
        if "printed" in message.__dict__:
            message.__dict__["vouched"] = fresh


def vouched_for(message: Message) -> bool:
    """Whether ``message`` is known to be as decoded without looking: no hook that keeps
    its changes to itself has run since it was last looked at, and none said it changed."""
    vouched = message.__dict__.get("vouched")
    return vouched is not None and vouched[0][0] == vouched[1]


def distrust(request: Request) -> None:
    """A hook ran that does not report its changes: each message is looked at again
    (encoded once) the next time ``content_key`` asks for it."""
    epoch = request.__dict__.get("epoch")
    if epoch is not None:
        epoch[0] += 1
        return
    # A request a plugin made (``ctx.request = ...``) may hold messages of the decoded one.
    for message in request.messages:
        message.__dict__.pop("vouched", None)


def forget_printed(message: Message) -> None:
    """``message`` was changed in place (a hook said so): it is no longer what it was
    decoded as, and goes out encoded."""
    message.__dict__.pop("printed", None)
    message.__dict__.pop("vouched", None)


_msgpack = msgspec.msgpack.Encoder().encode
_json = msgspec.json.Encoder().encode


def fingerprint(value: Any) -> bytes:
    """Bytes equal for equal values (canonical types, lists of them), made in one pass in C:
    how a stage sees whether a plugin changed something. MessagePack, which copies strings
    as they are where JSON scans them for escapes; JSON for what it cannot hold (an integer
    beyond 64 bits a plugin put in an ``extra``)."""
    try:
        return _msgpack(value)
    except OverflowError:
        return _json(value)


class Usage(msgspec.Struct, omit_defaults=True):
    """Tokens. ``input_tokens`` counts every input token, the cached ones included;
    ``cache_read_tokens`` and ``cache_write_tokens`` say how many of them were read from or
    written to the provider's prompt cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # What the provider's usage carried beyond these, in its own format.
    extra: dict[str, Any] = {}

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Response(msgspec.Struct, omit_defaults=True):
    """The answer. ``content`` holds text, tool calls, thinking and opaque blocks in
    order. With more than one choice (OpenAI ``n``), the first is this response and the
    others are in ``alternatives``. ``extra`` holds the unmodeled top-level fields,
    ``choice_extra`` those of the (first) choice and its message (``logprobs``...)."""

    id: str
    model: str
    content: list[Part] = []
    finish_reason: FinishReason = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    stop_sequence: str | None = None
    extra: dict[str, Any] = {}
    choice_extra: dict[str, Any] = {}
    alternatives: list[Response] = []

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        return [p for p in self.content if isinstance(p, ToolCallPart)]


# --- streaming -------------------------------------------------------------------------
# A stream is StreamStart, then deltas for content blocks numbered from 0 in order, then
# StreamEnd. Wire formats translate these one by one, never buffering the whole answer.
#
# ``raw`` is the provider's event as it came, when the client speaks the provider's
# format: such an event goes out as those bytes, so a same-format stream reaches the
# client byte for byte. b"" marks an event that came in the same provider event as the one
# before it (its bytes went out with that one). A plugin that changes an event makes the
# proxy encode that event (and the others from its provider event) from the canonical form.


class StreamStart(msgspec.Struct, tag="start"):
    id: str
    model: str
    usage: Usage = msgspec.field(default_factory=Usage)
    raw: bytes | None = None


class TextDelta(msgspec.Struct, tag="text_delta"):
    """Text for block ``index`` (the first delta opens the block). ``choice``: which of
    OpenAI's ``n`` choices; ``logprobs`` as OpenAI sends them, when asked for."""

    index: int
    text: str
    choice: int = 0
    logprobs: Any = None
    raw: bytes | None = None


class ThinkingDelta(msgspec.Struct, tag="thinking_delta"):
    index: int
    thinking: str
    raw: bytes | None = None


class SignatureDelta(msgspec.Struct, tag="signature_delta"):
    index: int
    signature: str
    raw: bytes | None = None


class ToolCallStart(msgspec.Struct, tag="tool_call_start"):
    index: int
    id: str
    name: str
    choice: int = 0
    raw: bytes | None = None


class ToolCallDelta(msgspec.Struct, tag="tool_call_delta"):
    index: int
    arguments: str
    choice: int = 0
    raw: bytes | None = None


class BlockStart(msgspec.Struct, tag="block_start"):
    """Opens a block the model has no delta type for (redacted thinking, a server tool's
    call or result), given whole as JSON in wire format ``format``."""

    index: int
    format: str
    block: dict[str, Any]
    raw: bytes | None = None


class BlockDelta(msgspec.Struct, tag="block_delta"):
    """A delta the model has no type for (a citation, a server tool's input), as JSON."""

    index: int
    format: str
    delta: dict[str, Any]
    raw: bytes | None = None


class BlockStop(msgspec.Struct, tag="block_stop"):
    index: int
    raw: bytes | None = None


class WireEvent(msgspec.Struct, tag="wire"):
    """A provider event with no canonical meaning (a ping, an event added last week): it
    reaches a client of its format as it came, and no one else."""

    format: str
    raw: bytes | None = None


class StreamEnd(msgspec.Struct, tag="end"):
    finish_reason: FinishReason = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    stop_sequence: str | None = None
    raw: bytes | None = None


StreamEvent = (StreamStart | TextDelta | ThinkingDelta | SignatureDelta | ToolCallStart
               | ToolCallDelta | BlockStart | BlockDelta | BlockStop | WireEvent | StreamEnd)


def _set_usage(usage: Usage, new: Usage) -> None:
    usage.input_tokens = new.input_tokens or usage.input_tokens
    usage.output_tokens = new.output_tokens or usage.output_tokens
    usage.cache_read_tokens = new.cache_read_tokens or usage.cache_read_tokens
    usage.cache_write_tokens = new.cache_write_tokens or usage.cache_write_tokens
    if new.extra:
        usage.extra = {**usage.extra, **new.extra}


class StreamAccumulator:
    """Assembles stream events into the Response they add up to (the first choice).
    Text arrives in many small pieces: they are kept in lists and joined once, when
    ``response`` is read."""

    def __init__(self) -> None:
        self._response = Response(id="", model="")
        # block index -> (part, pieces); pieces are text, thinking or argument pieces.
        self._blocks: dict[int, tuple[Part, list[str]]] = {}

    def add(self, event: StreamEvent) -> None:
        blocks = self._blocks
        if isinstance(event, TextDelta):
            if event.choice:
                return
            block = blocks.get(event.index)
            if block is None:
                blocks[event.index] = (TextPart(text=""), [event.text])
            else:
                block[1].append(event.text)
        elif isinstance(event, ToolCallDelta | ThinkingDelta):
            if getattr(event, "choice", 0):
                return
            block = blocks.get(event.index)
            piece = event.arguments if isinstance(event, ToolCallDelta) else event.thinking
            if block is not None:
                block[1].append(piece)
            elif isinstance(event, ThinkingDelta):
                blocks[event.index] = (ThinkingPart(thinking=""), [piece])
        elif isinstance(event, SignatureDelta):
            block = blocks.get(event.index)
            if block is None:
                blocks[event.index] = block = (ThinkingPart(thinking=""), [])
            if isinstance(block[0], ThinkingPart):
                block[0].signature += event.signature
        elif isinstance(event, ToolCallStart):
            if not event.choice:
                blocks[event.index] = (ToolCallPart(id=event.id, name=event.name,
                                                    arguments=""), [])
        elif isinstance(event, BlockStart):
            data = copy.deepcopy(event.block)  # deltas add to it; the event stays as sent
            part: Part
            if data.get("type") == "redacted_thinking" and isinstance(data.get("data"), str):
                part = RedactedThinkingPart(data=data["data"])
            elif data.get("type") == "text" and isinstance(data.get("text"), str):
                # Text with citations: the text grows by deltas, the citations too.
                text = data.pop("text")
                data.pop("type")
                blocks[event.index] = (TextPart(text="", extra=data), [text])
                return
            else:
                part = OpaquePart(format=event.format, kind=str(data.get("type", "")),
                                  data=data)
            blocks[event.index] = (part, [])
        elif isinstance(event, BlockDelta):
            block = blocks.get(event.index)
            if block is not None:
                _add_opaque_delta(block[0], event.delta, block[1])
        elif isinstance(event, StreamStart):
            response = self._response
            response.id, response.model = event.id, event.model
            _set_usage(response.usage, event.usage)
        elif isinstance(event, StreamEnd):
            response = self._response
            response.finish_reason = event.finish_reason
            response.stop_sequence = event.stop_sequence
            _set_usage(response.usage, event.usage)

    @property
    def response(self) -> Response:
        content: list[Part] = []
        for _, (part, pieces) in sorted(self._blocks.items()):
            if isinstance(part, TextPart):
                part.text = "".join(pieces)
            elif isinstance(part, ThinkingPart):
                part.thinking = "".join(pieces)
            elif isinstance(part, ToolCallPart):
                part.arguments = "".join(pieces) or "{}"
            elif isinstance(part, OpaquePart) and pieces:
                # A server tool's input, streamed as JSON text like a tool call's.
                with contextlib.suppress(msgspec.DecodeError):
                    part.data["input"] = msgspec.json.decode("".join(pieces))
            content.append(part)
        self._response.content = content
        return self._response


def _add_opaque_delta(part: Part, delta: dict[str, Any], pieces: list[str]) -> None:
    kind = delta.get("type")
    if kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
        pieces.append(delta["partial_json"])
    elif kind == "citations_delta" and isinstance(part, TextPart | OpaquePart):
        holder = part.extra if isinstance(part, TextPart) else part.data
        holder.setdefault("citations", []).append(delta.get("citation"))


def response_events(response: Response) -> list[StreamEvent]:
    """Replays a whole Response as stream events (short-circuits and cache hits)."""
    usage = response.usage
    events: list[StreamEvent] = [
        StreamStart(id=response.id, model=response.model,
                    usage=Usage(input_tokens=usage.input_tokens,
                                cache_read_tokens=usage.cache_read_tokens,
                                cache_write_tokens=usage.cache_write_tokens))
    ]
    for index, part in enumerate(response.content):
        if isinstance(part, TextPart):
            events.append(TextDelta(index=index, text=part.text))
        elif isinstance(part, ToolCallPart):
            events.append(ToolCallStart(index=index, id=part.id, name=part.name))
            events.append(ToolCallDelta(index=index, arguments=part.arguments))
        elif isinstance(part, ThinkingPart):
            events.append(ThinkingDelta(index=index, thinking=part.thinking))
            if part.signature:
                events.append(SignatureDelta(index=index, signature=part.signature))
        elif isinstance(part, RedactedThinkingPart):
            events.append(BlockStart(index=index, format="", block={
                "type": "redacted_thinking", "data": part.data}))
        elif isinstance(part, OpaquePart):
            events.append(BlockStart(index=index, format=part.format, block=part.data))
        else:
            continue
        events.append(BlockStop(index=index))
    events.append(StreamEnd(finish_reason=response.finish_reason, usage=response.usage,
                            stop_sequence=response.stop_sequence))
    return events
