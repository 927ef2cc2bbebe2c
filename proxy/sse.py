"""Reading server-sent events from a provider's response body."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[tuple[str, bytes]]]:
    """Yields, per chunk read from the network, the (event name, data) of each event it
    completed; comments and unknown fields are skipped. Keeping the network's batching
    lets the proxy pass a burst of events on in one write."""
    pending = b""
    event = ""
    data: list[bytes] = []
    for_chunk: list[tuple[str, bytes]] = []
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    for_chunk.append((event, b"\n".join(data)))
                event, data = "", []
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event = value.decode("utf-8", "replace")
        if for_chunk:
            yield for_chunk
            for_chunk = []
    if pending.startswith(b"data:"):
        data.append(pending[5:].lstrip(b" "))
    if data:
        yield [(event, b"\n".join(data))]
