"""Responses streams: a Responses-capable provider's typed events -> canonical stream events
(``StreamDecoder``), and canonical events -> the typed event sequence a Responses client
reads (``StreamEncoder``): response.created, response.in_progress, output items with their
content parts and deltas, each item's done events, response.completed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from proxy.canonical import (
    BlockStart,
    BlockStop,
    FinishReason,
    Request,
    Response,
    SignatureDelta,
    StreamEnd,
    StreamEvent,
    StreamStart,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    WireEvent,
)
from proxy.errors import ProxyError, UpstreamError, error_type
from proxy.formats.responses.common import (
    NAME,
    REDACTED_PREFIX,
    decode_usage,
    encode_json,
    finish_of,
    new_id,
)
from proxy.formats.responses.response import response_object

_decode = msgspec.json.Decoder().decode


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + encode_json(payload) + b"\n\n"


# --- provider -> canonical --------------------------------------------------------------


class StreamDecoder:
    """A Responses-capable provider's events -> canonical events, each keeping its bytes
    (only a Responses client is ever served by such a provider through this API). Items
    the canonical model has no type for (a web search call...) reach the accumulated
    answer whole, as they were when done."""

    def __init__(self, request: Request | None = None, same_format: bool = True) -> None:
        self.keep_raw = same_format
        self.ended = False
        self.next_index = 0
        # output_index -> canonical block indexes (a message has one per content part)
        self.blocks: dict[int, dict[Any, int]] = {}
        self.calls = False

    def _block(self, output_index: int, key: Any) -> int:
        blocks = self.blocks.setdefault(output_index, {})
        if key not in blocks:
            blocks[key] = self.next_index
            self.next_index += 1
        return blocks[key]

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        try:
            payload = _decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamError(502, f"Provider sent a malformed stream event: {exc}") from None
        if not isinstance(payload, dict):
            raise UpstreamError(502, "Provider sent a malformed stream event")
        kind = payload.get("type", event)
        raw = (b"event: " + str(kind).encode() + b"\ndata: " + data + b"\n\n"
               if self.keep_raw else None)
        output_index = payload.get("output_index", 0)
        if not isinstance(output_index, int):
            raise UpstreamError(502, "Provider sent a stream event with an invalid index")
        if kind == "response.output_text.delta":
            index = self._block(output_index, payload.get("content_index", 0))
            return [TextDelta(index=index, text=str(payload.get("delta", "")), raw=raw)]
        if kind == "response.function_call_arguments.delta":
            return [ToolCallDelta(index=self._block(output_index, "call"),
                                  arguments=str(payload.get("delta", "")), raw=raw)]
        if kind == "response.reasoning_summary_text.delta":
            return [ThinkingDelta(index=self._block(output_index, "reasoning"),
                                  thinking=str(payload.get("delta", "")), raw=raw)]
        if kind == "response.output_item.added":
            item = payload.get("item") or {}
            if isinstance(item, dict) and item.get("type") == "function_call":
                self.calls = True
                return [ToolCallStart(index=self._block(output_index, "call"),
                                      id=str(item.get("call_id", "")),
                                      name=str(item.get("name", "")), raw=raw)]
            return [WireEvent(format=NAME, raw=raw)]
        if kind == "response.output_item.done":
            return self._item_done(payload.get("item"), output_index, raw)
        if kind == "response.created":
            response = payload.get("response") or {}
            return [StreamStart(id=str(response.get("id", "")),
                                model=str(response.get("model", "")), raw=raw)]
        if kind in ("response.completed", "response.incomplete"):
            response = payload.get("response") or {}
            self.ended = True
            return [StreamEnd(finish_reason=finish_of(response.get("status"),
                                                      response.get("incomplete_details"),
                                                      self.calls),
                              usage=decode_usage(response.get("usage")), raw=raw)]
        if kind == "response.failed":
            error = (payload.get("response") or {}).get("error") or {}
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError(502, f"Provider's response failed mid-stream: {message}")
        if kind == "error":
            raise UpstreamError(502, f"Provider error mid-stream: {payload.get('message')}")
        return [WireEvent(format=NAME, raw=raw)]

    def _item_done(self, item: object, output_index: int, raw: bytes | None
                   ) -> list[StreamEvent]:
        if not isinstance(item, dict):
            return [WireEvent(format=NAME, raw=raw)]
        kind = item.get("type")
        known = self.blocks.get(output_index, {})
        out: list[StreamEvent] = []
        if kind == "reasoning":
            encrypted = item.get("encrypted_content")
            index = self._block(output_index, "reasoning")
            if isinstance(encrypted, str) and encrypted:
                out.append(SignatureDelta(index=index, signature=encrypted))
            out.append(BlockStop(index=index))
        elif kind in ("message", "function_call") and known:
            out.extend(BlockStop(index=index) for index in known.values())
        elif kind not in ("message", "function_call"):
            index = self._block(output_index, "item")
            out += [BlockStart(index=index, format=NAME, block=item), BlockStop(index=index)]
        else:
            return [WireEvent(format=NAME, raw=raw)]
        for position, event in enumerate(out):
            event.raw = raw if position == 0 else (b"" if raw is not None else None)
        return out

    def close(self) -> list[StreamEvent]:
        if self.ended:
            return []
        raise UpstreamError(502, "Provider stream ended before the answer was complete")


# --- canonical -> client ----------------------------------------------------------------


@dataclass
class _Item:
    """One output item being streamed: a message (one text part), reasoning or a call."""

    kind: str
    id: str
    output_index: int
    pieces: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    signature: str = ""
    content_index: int = 0
    done: bool = False


# Events a provider sends that close an item: regenerated here once a plugin has changed
# what the item holds.
_CLOSING = (b"event: response.output_text.done", b"event: response.content_part.done",
            b"event: response.function_call_arguments.done",
            b"event: response.reasoning_summary_text.done",
            b"event: response.reasoning_summary_part.done")


class StreamEncoder:
    """Canonical events -> the client's typed events. An event carrying a Responses-capable
    provider's bytes goes out as them; once a plugin has changed an event, the events that
    close an item and the response are written here from what the client was sent.
    ``final`` is the completed response object (for storing)."""

    media_type = "text/event-stream"

    def __init__(self, request: Request, response_id: str = "",
                 echo: dict[str, Any] | None = None) -> None:
        self.request = request
        self.echo = echo
        self.response_id = response_id
        self.model = request.model
        self.sequence = 0
        self.blocks: dict[int, _Item] = {}
        self.items: dict[int, dict[str, Any]] = {}  # output_index -> the done item
        self.next_output = 0
        self.passed_raw = False
        self.rewriting = False
        # item type -> (id, output_index) of the last item a provider opened
        self.opened: dict[str, tuple[str, int]] = {}
        self.provider_response: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.usage = Usage()

    # --- writing events -----------------------------------------------------------------

    def _event(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return sse(kind, data)

    def _skeleton(self, status: str) -> dict[str, Any]:
        empty = Response(id=self.response_id, model=self.model)
        return response_object(empty, self.request, self.response_id, same_format=False,
                               status=status, output=[], echo=self.echo)

    def encode(self, event: StreamEvent) -> bytes:
        if event.raw is not None:
            if event.raw:
                self.passed_raw = True
                self.sequence += 1
            return self._pass(event)
        if self.passed_raw:
            self.rewriting = True
        return self._write(event)

    def _pass(self, event: StreamEvent) -> bytes:
        """A provider's event: noted, and passed on (or, while rewriting, a closing
        event is left out: it is written again at the item's end)."""
        raw = event.raw or b""
        if isinstance(event, StreamStart):
            self.response_id, self.model = event.id or self.response_id, event.model or \
                self.model
        elif raw.startswith(b"event: response.output_item.added"):
            item, output_index = self._payload_item(raw)
            self.opened[str(item.get("type"))] = (str(item.get("id", "")), output_index)
            self.next_output = max(self.next_output, output_index + 1)
            if isinstance(event, ToolCallStart):
                self._note(event)
        elif isinstance(event, WireEvent) and self.rewriting and raw.startswith(_CLOSING):
            return b""
        elif isinstance(event, TextDelta | ThinkingDelta | ToolCallDelta | SignatureDelta):
            self._note(event)
        elif isinstance(event, BlockStop | BlockStart):
            if raw.startswith(b"event: response.output_item.done"):
                item, output_index = self._payload_item(raw)
                self.items[output_index] = item
                if self.rewriting and event.index in self.blocks:
                    return self._close(self.blocks[event.index])
            block = self.blocks.get(event.index)
            if block is not None:
                block.done = True
        elif isinstance(event, StreamEnd):
            self.usage = event.usage
            payload = _decode(raw.split(b"\ndata: ", 1)[1]) if b"\ndata: " in raw else {}
            response = payload.get("response") if isinstance(payload, dict) else None
            self.provider_response = response if isinstance(response, dict) else None
            if self.rewriting:
                return self._end(event)
            self.final = self.provider_response
        return raw

    def _payload_item(self, raw: bytes) -> tuple[dict[str, Any], int]:
        try:
            payload = _decode(raw.split(b"\ndata: ", 1)[1])
        except (IndexError, msgspec.DecodeError):
            return {}, 0
        item = payload.get("item") if isinstance(payload, dict) else None
        output_index = payload.get("output_index", 0) if isinstance(payload, dict) else 0
        return (item if isinstance(item, dict) else {},
                output_index if isinstance(output_index, int) else 0)

    def _note(self, event: StreamEvent) -> None:
        """What a provider's content event adds to its item (the item's ids come from the
        events that opened it)."""
        index = getattr(event, "index", 0)
        block = self.blocks.get(index)
        if block is None:
            kind = ("message" if isinstance(event, TextDelta) else "function_call"
                    if isinstance(event, ToolCallStart | ToolCallDelta) else "reasoning")
            block = self._learned(index, kind)
            if isinstance(event, ToolCallStart):
                block.call_id, block.name = event.id, event.name
        if isinstance(event, TextDelta):
            block.pieces.append(event.text)
        elif isinstance(event, ThinkingDelta):
            block.pieces.append(event.thinking)
        elif isinstance(event, ToolCallDelta):
            block.pieces.append(event.arguments)
        elif isinstance(event, SignatureDelta):
            block.signature += event.signature

    def _learned(self, index: int, kind: str) -> _Item:
        """The block ``index`` in the item of ``kind`` a provider opened last."""
        item_id, output_index = self.opened.get(kind, ("", self.next_output - 1))
        block = self.blocks[index] = _Item(
            kind, item_id, output_index,
            content_index=sum(1 for b in self.blocks.values()
                              if b.id == item_id and kind == "message"))
        return block

    def _write(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):
            if event.choice:
                return b""
            block, out = self._open(event.index, "message")
            block.pieces.append(event.text)
            if not event.text:
                return out
            return out + self._event("response.output_text.delta", item_id=block.id,
                                     output_index=block.output_index,
                                     content_index=block.content_index, delta=event.text,
                                     logprobs=[])
        if isinstance(event, ThinkingDelta):
            block, out = self._open(event.index, "reasoning")
            block.pieces.append(event.thinking)
            if not event.thinking:
                return out
            return out + self._event("response.reasoning_summary_text.delta",
                                     item_id=block.id, output_index=block.output_index,
                                     summary_index=0, delta=event.thinking)
        if isinstance(event, SignatureDelta):
            block, out = self._open(event.index, "reasoning")
            block.signature += event.signature
            return out
        if isinstance(event, ToolCallStart):
            if event.choice:
                return b""
            _, out = self._open(event.index, "function_call", event.id, event.name)
            return out
        if isinstance(event, ToolCallDelta):
            if event.choice:
                return b""
            block, out = self._open(event.index, "function_call")
            block.pieces.append(event.arguments)
            return out + self._event("response.function_call_arguments.delta",
                                     item_id=block.id, output_index=block.output_index,
                                     delta=event.arguments)
        if isinstance(event, BlockStart):
            return self._whole_item(event)
        if isinstance(event, BlockStop):
            stopped = self.blocks.get(event.index)
            return self._close(stopped) if stopped is not None and not stopped.done else b""
        if isinstance(event, StreamStart):
            self.model = event.model or self.model
            self.usage = event.usage
            self.response_id = self.response_id or new_id("resp")
            return (self._event("response.created", response=self._skeleton("in_progress"))
                    + self._event("response.in_progress",
                                  response=self._skeleton("in_progress")))
        if isinstance(event, StreamEnd):
            return self._end(event)
        return b""  # another API's events, citations: no form here

    def _open(self, index: int, kind: str, call_id: str = "", name: str = ""
              ) -> tuple[_Item, bytes]:
        block = self.blocks.get(index)
        if block is not None:
            return block, b""
        if kind in self.opened:
            # A provider's item, opened by events that went out as they came.
            block = self._learned(index, kind)
            block.call_id, block.name = call_id or block.call_id, name or block.name
            return block, b""
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        block = self.blocks[index] = _Item(kind, new_id(prefix), self.next_output,
                                           call_id=call_id, name=name)
        self.next_output += 1
        item: dict[str, Any] = {"id": block.id, "type": kind}
        if kind == "message":
            item.update(status="in_progress", role="assistant", content=[])
        elif kind == "reasoning":
            item["summary"] = []
        else:
            item.update(status="in_progress", call_id=call_id, name=name, arguments="")
        out = self._event("response.output_item.added", output_index=block.output_index,
                          item=item)
        if kind == "message":
            out += self._event("response.content_part.added", item_id=block.id,
                               output_index=block.output_index, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
        elif kind == "reasoning":
            out += self._event("response.reasoning_summary_part.added", item_id=block.id,
                               output_index=block.output_index, summary_index=0,
                               part={"type": "summary_text", "text": ""})
        return block, out

    def _whole_item(self, event: BlockStart) -> bytes:
        """A block that arrives whole: Anthropic's redacted thinking (as reasoning whose
        encrypted content carries it), or a Responses item the model has no type for."""
        data = event.block
        if data.get("type") == "redacted_thinking" and isinstance(data.get("data"), str):
            item: dict[str, Any] = {"id": new_id("rs"), "type": "reasoning", "summary": [],
                                    "encrypted_content": REDACTED_PREFIX + data["data"]}
        elif event.format == NAME:
            item = data
        else:
            return b""  # another API's server-tool block
        output_index = self.next_output
        self.next_output += 1
        self.blocks[event.index] = _Item(str(item.get("type")), str(item.get("id", "")),
                                         output_index, done=True)
        self.items[output_index] = item
        return (self._event("response.output_item.added", output_index=output_index,
                            item=item)
                + self._event("response.output_item.done", output_index=output_index,
                              item=item))

    def _close(self, block: _Item) -> bytes:
        block.done = True
        text = "".join(block.pieces)
        where = {"item_id": block.id, "output_index": block.output_index}
        out = b""
        if block.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item: dict[str, Any] = {"id": block.id, "type": "message", "status": "completed",
                                    "role": "assistant", "content": [part]}
            previous = self.items.get(block.output_index)
            if previous is not None and previous.get("id") == block.id:
                # A provider's message with several parts: this one replaced in it.
                content = list(previous.get("content") or [])
                while len(content) <= block.content_index:
                    content.append(part)
                content[block.content_index] = {**content[block.content_index], "text": text}
                item = {**previous, "content": content}
            out += self._event("response.output_text.done", **where,
                               content_index=block.content_index, text=text, logprobs=[])
            out += self._event("response.content_part.done", **where,
                               content_index=block.content_index, part=part)
        elif block.kind == "reasoning":
            summary = [{"type": "summary_text", "text": text}] if text else []
            item = {"id": block.id, "type": "reasoning", "summary": summary}
            if block.signature:
                item["encrypted_content"] = block.signature
            if text:
                out += self._event("response.reasoning_summary_text.done", **where,
                                   summary_index=0, text=text)
                out += self._event("response.reasoning_summary_part.done", **where,
                                   summary_index=0, part=summary[0])
        else:
            arguments = text or "{}"
            item = {"id": block.id, "type": "function_call", "status": "completed",
                    "call_id": block.call_id, "name": block.name, "arguments": arguments}
            out += self._event("response.function_call_arguments.done", **where,
                               name=block.name, arguments=arguments)
        self.items[block.output_index] = item
        return out + self._event("response.output_item.done",
                                 output_index=block.output_index, item=item)

    def _end(self, event: StreamEnd) -> bytes:
        out = b"".join(self._close(b) for b in sorted(self.blocks.values(),
                                                      key=lambda b: b.output_index)
                       if not b.done)
        output = [self.items[i] for i in sorted(self.items)]
        finish: FinishReason = event.finish_reason
        if self.provider_response is not None:
            body = {**self.provider_response, "output": output}
        else:
            answer = Response(id=self.response_id, model=self.model,
                              finish_reason=finish, usage=event.usage)
            body = response_object(answer, self.request, self.response_id,
                                   same_format=False, output=output, echo=self.echo)
        self.final = body
        kind = "response.incomplete" if body.get("status") == "incomplete" else \
            "response.completed"
        return out + self._event(kind, response=body)

    def encode_error(self, error: ProxyError) -> bytes:
        body = self._skeleton("failed")
        body["error"] = {"code": error.code or error_type(error.status),
                         "message": error.message}
        body["output"] = [self.items[i] for i in sorted(self.items)]
        return (self._event("error", code=error.code or error_type(error.status),
                            message=error.message, param=None)
                + self._event("response.failed", response=body))
