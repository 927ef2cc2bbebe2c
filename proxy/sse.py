"""Reading server-sent events from a provider's response body."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """Yields (event name, data) per event; comments and unknown fields are skipped."""
    pending = b""
    event = ""
    data: list[bytes] = []
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data = "", []
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event = value.decode("utf-8", "replace")
    if pending.startswith(b"data:"):
        data.append(pending[5:].lstrip(b" "))
    if data:
        yield event, b"\n".join(data)
