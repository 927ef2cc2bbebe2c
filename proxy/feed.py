"""The live feed behind ``GET /dashboard/events``: recent records held in memory, each
with an id, handed to every subscriber. A subscriber that falls too far behind is
dropped (its client reconnects with Last-Event-ID and resumes from what is held); it
never holds back the others or the requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

_WAKE = (0, b"")


class Subscriber:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(maxsize=size)
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

    def publish(self, data: bytes) -> int:
        self.last_id += 1
        entry = (self.last_id, data)
        entries = self.entries
        entries.append(entry)
        self.bytes += len(data)
        while len(entries) > self.held or (self.bytes > self.held_bytes and len(entries) > 1):
            self.bytes -= len(entries.popleft()[1])
        for subscriber in list(self.subscribers):
            try:
                subscriber.queue.put_nowait(entry)
            except asyncio.QueueFull:
                subscriber.dropped = True
                self.subscribers.discard(subscriber)
                self.dropped_subscribers += 1
        return self.last_id

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
            with contextlib.suppress(asyncio.QueueFull):
                subscriber.queue.put_nowait(_WAKE)
        self.subscribers.clear()

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self.subscriber_queue)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
