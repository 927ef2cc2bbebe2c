"""The canonical request, response and stream-event types every stage works on.

Each wire format (``proxy.formats.openai``, ``proxy.formats.anthropic``) converts to and
from these. ``extra`` fields hold what a wire format carried that the proxy does not model;
they are written back only when the request goes to a provider of the same format, so a
vendor parameter added last week still reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import msgspec

Role = Literal["user", "assistant"]
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


class ToolCallPart(msgspec.Struct, tag="tool_call", omit_defaults=True):
    """A call the assistant makes; ``arguments`` is the JSON text of the arguments."""

    id: str
    name: str
    arguments: str = "{}"
    extra: dict[str, Any] = {}


class ToolResultPart(msgspec.Struct, tag="tool_result", omit_defaults=True):
    """The result of a tool call, sent back in a user turn."""

    tool_call_id: str
    content: list[TextPart | ImagePart] = []
    is_error: bool = False
    extra: dict[str, Any] = {}


Part = TextPart | ImagePart | ToolCallPart | ToolResultPart


class Message(msgspec.Struct, omit_defaults=True):
    role: Role
    content: list[Part]
    name: str | None = None
    extra: dict[str, Any] = {}

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class Tool(msgspec.Struct, omit_defaults=True):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    extra: dict[str, Any] = {}


class ToolChoice(msgspec.Struct, omit_defaults=True):
    """``auto``, ``none``, ``required`` (any tool) or ``tool`` (the one named)."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None


class Request(msgspec.Struct, omit_defaults=True):
    model: str
    messages: list[Message]
    system: list[TextPart] = []
    tools: list[Tool] = []
    tool_choice: ToolChoice | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = []
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
        return "\n\n".join(p.text for p in self.system)

    def message_texts(self) -> Iterator[str]:
        """Each message's text, newest first: its text parts joined as the provider joins
        them, then its tool results' text; then the system prompt. Empty ones are left
        out. Per-message work iterates this, and can stop early."""
        for message in reversed(self.messages):
            texts = []
            for part in message.content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part, ToolResultPart):
                    texts.extend(p.text for p in part.content if isinstance(p, TextPart))
            text = texts[0] if len(texts) == 1 else "".join(texts)
            if text:
                yield text
        if self.system:
            yield self.system_text

    def prompt_text(self) -> str:
        """All text of the system prompt and the messages, for matching and estimates."""
        texts = [p.text for p in self.system]
        for message in self.messages:
            for part in message.content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part, ToolResultPart):
                    texts.extend(p.text for p in part.content if isinstance(p, TextPart))
        return "\n".join(texts)


class Usage(msgspec.Struct, omit_defaults=True):
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Response(msgspec.Struct, omit_defaults=True):
    id: str
    model: str
    content: list[TextPart | ToolCallPart] = []
    finish_reason: FinishReason = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    stop_sequence: str | None = None
    extra: dict[str, Any] = {}

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        return [p for p in self.content if isinstance(p, ToolCallPart)]


# --- streaming -------------------------------------------------------------------------
# A stream is StreamStart, then deltas for content blocks numbered from 0 in order, then
# StreamEnd. Wire formats translate these one by one, never buffering the whole answer.


class StreamStart(msgspec.Struct, tag="start"):
    id: str
    model: str
    usage: Usage = msgspec.field(default_factory=Usage)


class TextDelta(msgspec.Struct, tag="text_delta"):
    index: int
    text: str


class ToolCallStart(msgspec.Struct, tag="tool_call_start"):
    index: int
    id: str
    name: str


class ToolCallDelta(msgspec.Struct, tag="tool_call_delta"):
    index: int
    arguments: str


class StreamEnd(msgspec.Struct, tag="end"):
    finish_reason: FinishReason = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    stop_sequence: str | None = None


StreamEvent = StreamStart | TextDelta | ToolCallStart | ToolCallDelta | StreamEnd


class StreamAccumulator:
    """Assembles stream events into the Response they add up to. Text arrives in many
    small pieces: they are kept in lists and joined once, when ``response`` is read."""

    def __init__(self) -> None:
        self._response = Response(id="", model="")
        # One (part, pieces) per content block, in order.
        self._blocks: list[tuple[TextPart | ToolCallPart, list[str]]] = []

    def add(self, event: StreamEvent) -> None:
        blocks = self._blocks
        if isinstance(event, TextDelta):
            if blocks and isinstance(blocks[-1][0], TextPart):
                blocks[-1][1].append(event.text)
            else:
                blocks.append((TextPart(text=""), [event.text]))
        elif isinstance(event, ToolCallDelta):
            for part, pieces in reversed(blocks):
                if isinstance(part, ToolCallPart):
                    pieces.append(event.arguments)
                    break
        elif isinstance(event, ToolCallStart):
            blocks.append((ToolCallPart(id=event.id, name=event.name, arguments=""), []))
        elif isinstance(event, StreamStart):
            response = self._response
            response.id, response.model = event.id, event.model
            response.usage.input_tokens = event.usage.input_tokens
        elif isinstance(event, StreamEnd):
            response = self._response
            response.finish_reason = event.finish_reason
            response.stop_sequence = event.stop_sequence
            if event.usage.input_tokens:
                response.usage.input_tokens = event.usage.input_tokens
            response.usage.output_tokens = event.usage.output_tokens

    @property
    def response(self) -> Response:
        content: list[TextPart | ToolCallPart] = []
        for part, pieces in self._blocks:
            if isinstance(part, TextPart):
                part.text = "".join(pieces)
            else:
                part.arguments = "".join(pieces) or "{}"
            content.append(part)
        self._response.content = content
        return self._response


def response_events(response: Response) -> list[StreamEvent]:
    """Replays a whole Response as stream events (short-circuits and cache hits)."""
    events: list[StreamEvent] = [
        StreamStart(id=response.id, model=response.model,
                    usage=Usage(input_tokens=response.usage.input_tokens))
    ]
    for index, part in enumerate(response.content):
        if isinstance(part, TextPart):
            events.append(TextDelta(index=index, text=part.text))
        else:
            events.append(ToolCallStart(index=index, id=part.id, name=part.name))
            events.append(ToolCallDelta(index=index, arguments=part.arguments))
    events.append(StreamEnd(finish_reason=response.finish_reason, usage=response.usage,
                            stop_sequence=response.stop_sequence))
    return events
