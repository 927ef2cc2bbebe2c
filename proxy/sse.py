"""Reading server-sent events from a provider's response body."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

Event = tuple[str, bytes]


class EventTooLarge(Exception):
    """The provider sent more than the cap without finishing an event."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an event grew past {limit} bytes without ending")
        self.limit = limit


def _parse_block(block: bytes) -> list[Event]:
    event = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
    return [(event, b"\n".join(data))] if data else []


def _events(blocks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for block in blocks:
        # The common shape, one data line, without a per-line loop.
        if block.startswith(b"data: ") and b"\n" not in block:
            events.append(("", block[6:]))
        elif block:
            events.extend(_parse_block(block))
    return events


async def iter_sse(chunks: AsyncIterable[bytes], max_event_bytes: int = 0
                   ) -> AsyncIterator[list[Event]]:
    """Yields, per chunk read from the network, the (event name, data) of each event it
    completed; comments and unknown fields are skipped. Keeping the network's batching
    lets the proxy pass a burst of events on in one write.

    Work is linear in the bytes read: an unfinished event is kept in one growing buffer
    that is searched only where it is new, and past ``max_event_bytes`` (0: no cap)
    ``EventTooLarge`` is raised rather than reading on."""
    pending = bytearray()
    # How far ``pending`` has been searched for a blank line already.
    searched = 0
    carry_cr = False
    async for chunk in chunks:
        if carry_cr:
            chunk = b"\r" + chunk
        # A CRLF may be split between two reads: keep a trailing CR for the next one.
        carry_cr = chunk.endswith(b"\r")
        if carry_cr:
            chunk = chunk[:-1]
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if not pending:
            end = chunk.rfind(b"\n\n")
            if end == -1:
                pending += chunk
                searched = max(len(pending) - 1, 0)
            else:
                pending += chunk[end + 2:]
                searched = max(len(pending) - 1, 0)
                events = _events(chunk[:end].split(b"\n\n"))
                if events:
                    yield events
        else:
            start = searched
            pending += chunk
            end = pending.rfind(b"\n\n", start)
            if end == -1:
                searched = max(len(pending) - 1, 0)
            else:
                complete = bytes(pending[:end])
                del pending[:end + 2]
                searched = max(len(pending) - 1, 0)
                events = _events(complete.split(b"\n\n"))
                if events:
                    yield events
        if max_event_bytes and len(pending) > max_event_bytes:
            raise EventTooLarge(max_event_bytes)
    rest = bytes(pending).strip()
    if rest:
        events = _parse_block(rest)
        if events:
            yield events
