"""Reading server-sent events from a provider's response body."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

Event = tuple[str, bytes]


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


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[Event]]:
    """Yields, per chunk read from the network, the (event name, data) of each event it
    completed; comments and unknown fields are skipped. Keeping the network's batching
    lets the proxy pass a burst of events on in one write."""
    pending = b""
    async for chunk in chunks:
        buffer = pending + chunk if pending else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        pending = blocks.pop()
        events: list[Event] = []
        for block in blocks:
            # The common shape, one data line, without a per-line loop.
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(("", block[6:]))
            elif block:
                events.extend(_parse_block(block))
        if events:
            yield events
    if pending.strip():
        rest = _parse_block(pending.strip())
        if rest:
            yield rest
