"""The live feed behind ``GET /dashboard/events``: recent records held in memory, each
with an id, handed to every subscriber. A subscriber that falls too far behind is
dropped (its client reconnects with Last-Event-ID and resumes from what is held); it
never holds back the others or the requests.

With a shared store (Redis), ``SharedFeed`` sends this process's records to a capped
Redis Stream and feeds every record there — every worker's and every replica's — into
the feed here, under the stream's ids: each viewer sees all traffic, and a Last-Event-ID
from one worker resumes on any other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING

import structlog

from proxy.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from proxy.observe import Observer
    from proxy.redisstore import RedisStore

log = structlog.get_logger("hookproxy.feed")
_WAKE = (0, b"")
STREAM = "feed"
FLUSH_EVERY = 0.05


class Subscriber:
    def __init__(self, size: int) -> None:
        # Bounded by the feed: it lets a subscriber go once ``size`` records wait for it.
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.size = size
        self.dropped = False


class Feed:
    def __init__(self, held: int = 1000, subscriber_queue: int = 1000,
                 held_bytes: int = 32 * 1024 * 1024) -> None:
        # Held back for replay: at most ``held`` records and ``held_bytes`` of them.
        self.entries: deque[tuple[int, bytes]] = deque()
        self.held = held
        self.held_bytes = held_bytes
        self.bytes = 0
        self.subscribers: set[Subscriber] = set()
        self.subscriber_queue = subscriber_queue
        self.last_id = 0
        self.dropped_subscribers = 0

    def publish(self, data: bytes, id: int | None = None) -> int:
        """Holds ``data`` and hands it to the subscribers, under ``id`` (the next one if
        None); one at or below the last id is already here and is not handed out again."""
        if id is None:
            id = self.last_id + 1
        elif id <= self.last_id:
            return self.last_id
        self._hand_out([self._hold(id, data)])
        return self.last_id

    def publish_many(self, records: list[bytes]) -> None:
        """Holds and hands out ``records`` (the next ids, in order) in one go: a subscriber
        is let go only if what it had not read yet was already at its bound."""
        self._hand_out([self._hold(self.last_id + 1, data) for data in records])

    def _hold(self, id: int, data: bytes) -> tuple[int, bytes]:
        self.last_id = id
        entry = (id, data)
        entries = self.entries
        entries.append(entry)
        self.bytes += len(data)
        while len(entries) > self.held or (self.bytes > self.held_bytes and len(entries) > 1):
            self.bytes -= len(entries.popleft()[1])
        return entry

    def _hand_out(self, batch: list[tuple[int, bytes]]) -> None:
        for subscriber in list(self.subscribers):
            queue = subscriber.queue
            if queue.qsize() >= subscriber.size:
                subscriber.dropped = True
                self.subscribers.discard(subscriber)
                self.dropped_subscribers += 1
                # Wakes its reader, which sees that it was let go.
                queue.put_nowait(_WAKE)
                continue
            for entry in batch:
                queue.put_nowait(entry)

    def since(self, last_id: int) -> list[tuple[int, bytes]]:
        """Held entries after ``last_id`` (all held ones for 0, or for an id this process
        never gave out, as after a restart)."""
        if last_id > self.last_id:
            last_id = 0
        return [entry for entry in self.entries if entry[0] > last_id]

    def close(self) -> None:
        """Ends every subscription (the server is shutting down)."""
        for subscriber in list(self.subscribers):
            subscriber.dropped = True
            subscriber.queue.put_nowait(_WAKE)
        self.subscribers.clear()

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self.subscriber_queue)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)


class SharedFeed:
    """Relays records through the shared store's stream, both ways."""

    def __init__(self, feed: Feed, store: RedisStore, length: int) -> None:
        self.feed, self.store, self.length = feed, store, length
        self._pending: list[bytes] = []
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None

    def publish_many(self, records: list[bytes]) -> None:
        """Queues records of this process for the stream. Records go in batches, one
        round trip each, at most every ``FLUSH_EVERY`` seconds: a busy worker does not
        make a round trip per request."""
        self._pending.extend(records)
        if not self._flushing:
            self._flushing = True
            loop = asyncio.get_running_loop()
            loop.call_later(FLUSH_EVERY, self._start_flush, loop)

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def stop(self) -> None:
        if self._pending:
            await self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self.store.stream_add(STREAM, batch, self.length)
                except StoreUnavailable:
                    # The viewers of this process at least still see its own records.
                    for data in batch:
                        self.feed.publish(data)
        finally:
            self._flushing = False

    async def _read(self) -> None:
        """Feeds the stream into the feed here: first the newest ``held`` records, for
        replay, then each new one as it comes."""
        last: str | None = None
        while True:
            try:
                if last is None:
                    entries = await self.store.stream_recent(STREAM, self.feed.held)
                    last = entries[-1][0] if entries else "0-0"
                else:
                    entries = await self.store.stream_read(STREAM, last)
            except StoreUnavailable:
                await asyncio.sleep(1.0)
                continue
            for stream_id, data in entries:
                self.feed.publish(data, stream_number(stream_id))
                last = stream_id


def stream_number(stream_id: str) -> int:
    """A stream id (``<ms>-<seq>``) as one increasing number, for SSE ids."""
    ms, _, seq = stream_id.partition("-")
    return int(ms) * 1_000_000 + int(seq or 0)


def shared_feed(observer: Observer, store: Store, length: int) -> SharedFeed | None:
    """Routes ``observer``'s records through ``store`` when it is shared (Redis)."""
    from proxy.redisstore import RedisStore

    if not isinstance(store, RedisStore):
        return None
    relay = SharedFeed(observer.feed, store, length)
    observer.relay = relay.publish_many
    return relay
