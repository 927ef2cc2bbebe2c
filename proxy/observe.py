"""Where every finished request goes: one record, encoded once, to the JSONL log, the
live feed and the metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import msgspec
import structlog

from proxy.canonical import Request
from proxy.config import Config
from proxy.context import RequestContext
from proxy.errors import ProxyError, error_type
from proxy.feed import Feed
from proxy.formats import FORMATS
from proxy.formats.common import NOT_DECODED, as_sent
from proxy.logwriter import LogWriter
from proxy.metrics import Metrics
from proxy.record import (
    KEEP_NEWEST,
    ErrorInfo,
    Record,
    body_view,
    build_record,
    rejected_record,
)

_encode = msgspec.json.Encoder().encode
# Request bodies waiting for the observer's thread, at most; beyond, records go out at
# once without their bodies (a burst of huge requests cannot pile up in memory).
PENDING_BYTES = 64 * 1024 * 1024
# The observer's thread gathers the records of this long into one batch: it takes the
# interpreter from the event loop once per batch rather than once per request.
BATCH_EVERY = 0.02


class Observer:
    """Builds each finished request's record and hands it to the log, the feed and the
    metrics.

    The cheap fields are read on the event loop as the request ends; the bodies (the part
    that grows with the request) are built, and the record encoded, on the observer's own
    thread, which then passes the line to the log writer and the event back to the loop
    for the feed. The thread works in batches (what ``BATCH_EVERY`` gathers), and hands
    each batch back to the loop in one call. Records leave in the order requests finished.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        log = config.log
        self.writer = (LogWriter(log.path, max_bytes=log.max_bytes, keep=log.keep,
                                 queue_size=log.queue_size) if log.path else None)
        self.feed = Feed(held=config.dashboard.held,
                         subscriber_queue=config.dashboard.subscriber_queue,
                         held_bytes=config.dashboard.held_bytes)
        self.metrics = Metrics()
        # Where records go for the dashboard: the feed here, or through a shared store
        # to every worker's feed (proxy.feed.SharedFeed).
        self.relay: Callable[[list[bytes]], object] = self.feed.publish_many
        self.loop: asyncio.AbstractEventLoop | None = None
        # Records waiting for their bodies; past queue_size they go out without them.
        # deque.append and popleft are atomic: the loop appends, the thread takes.
        self._pending: deque[tuple[Record, Any, Any, int]] = deque()
        # Set when the thread has work (or must stop); cleared by the thread.
        self._wake = threading.Event()
        self._stop = False
        self._pending_count = 0
        self._pending_bytes = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # The server's event loop, for whoever needs to reach in from another thread.
        self.loop = asyncio.get_running_loop()
        if self.writer is not None:
            self.writer.start()
        self._thread = threading.Thread(target=self._run, name="hookproxy-records",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finishes the records still waiting, then flushes the log."""
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join(30)
            self._thread = None
        if self.writer is not None:
            self.writer.close()

    def finished(self, ctx: RequestContext) -> None:
        log = self.config.log
        record = build_record(ctx, bodies="none")
        self.metrics.observe(record)
        size = ctx.body_bytes
        if log.bodies == "none" or self._thread is None or \
                self._pending_count >= log.queue_size or \
                self._pending_bytes + size > PENDING_BYTES:
            # Bodies are what keeps memory: past the backlog's bounds, records go without.
            if log.bodies != "none":
                record.bodies_dropped = size
            self._publish(record)
            return
        self._pending_count += 1
        self._pending_bytes += size
        request: Request | _Undecoded | None = ctx.decoded_request
        if request is None:
            request = _Undecoded(FORMATS[ctx.client_format], ctx.request_fields)
        self._queue((record, request, ctx.response, size))

    def rejected(self, request_id: str, endpoint: str, client_format: str, error: ProxyError,
                 started_wall: float, started: float, duration: float | None = None) -> None:
        """A request that failed before it could be decoded still leaves its record."""
        info = ErrorInfo(type=error.code or error_type(error.status), message=error.message,
                         stage=error.stage)
        if duration is None:
            duration = time.perf_counter() - started
        record = rejected_record(request_id, endpoint, client_format, error.status, info,
                                 started_wall, duration)
        self.metrics.observe(record)
        if self._thread is not None and self._pending_count:
            # Behind records still being made on the thread: they finished first.
            self._pending_count += 1
            self._queue((record, None, None, 0))
            return
        self._publish(record)

    def _publish(self, record: Record) -> None:
        data = self._encode(record)
        self._write(data)
        self.relay([data])

    def _write(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.submit(data + b"\n"):
            self.metrics.log_dropped()

    def _encode(self, record: Record) -> bytes:
        data = _encode(record)
        cap = self.config.log.max_record_bytes
        if len(data) > cap and (record.request is not None or record.response is not None):
            record.request = record.response = None
            record.bodies_dropped = len(data)
            data = _encode(record)
        return data

    def _queue(self, item: tuple[Record, Any, Any, int]) -> None:
        self._pending.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stop:
                # What else finishes meanwhile joins the batch (and need not wake us).
                time.sleep(BATCH_EVERY)
            self._wake.clear()
            self._run_batch()
            if self._stop and not self._pending:
                return

    def _run_batch(self) -> None:
        """Builds and encodes the records waiting, writes them to the log and hands them to
        the loop, in order, in one call."""
        done: list[tuple[bytes, int]] = []
        pending = self._pending
        while pending:
            record, request, response, size = pending.popleft()
            data = self._with_bodies(record, request, response)
            self._write(data)
            done.append((data, size))
        if not done:
            return
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._feed, done)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        for _, size in done:
            self._done(size)

    def _with_bodies(self, record: Record, request: Any, response: Any) -> bytes:
        """The record with its bodies, each made on its own: one that cannot be shown
        leaves the other."""
        record.request = self._view(record, "request", request)
        record.response = self._view(record, "response", response)
        try:
            return self._encode(record)
        except Exception:
            structlog.get_logger("hookproxy.observe").exception(
                "record_bodies_failed", request_id=record.id)
            record.request = record.response = None
            return _encode(record)

    def _view(self, record: Record, which: str, value: Any) -> Any:
        log = self.config.log
        try:
            omitted = 0
            if isinstance(value, _Undecoded):
                value, omitted = value.preview()
            return body_view(value, log.bodies, log.truncate_chars, log.max_record_bytes,
                             omitted)
        except Exception:  # a bug: said once per record, the rest of the record kept
            structlog.get_logger("hookproxy.observe").exception(
                "record_body_failed", request_id=record.id, body=which)
            return None

    def _feed(self, done: list[tuple[bytes, int]]) -> None:
        for _, size in done:
            self._done(size)
        self.relay([data for data, _ in done])

    def _done(self, size: int) -> None:
        self._pending_count -= 1
        self._pending_bytes -= size


class _Undecoded(NamedTuple):
    """A request nothing decoded whole: its top-level fields, to show in the record."""

    wire: ModuleType
    peeked: Request  # as ``peek_request`` left it: the rest is its wire JSON

    def preview(self) -> tuple[Request | dict[str, Any] | None, int]:
        """The request with the messages a record shows (see ``body_view``) decoded, and
        how many others it has. A request whose messages do not decode (it went to a
        provider of its format as it came, or was refused for them) is shown as sent."""
        try:
            preview = self.wire.preview_request(self.peeked, KEEP_NEWEST)
        except NOT_DECODED as exc:
            reason = exc.message if isinstance(exc, ProxyError) else \
                f"{type(exc).__name__}: {exc}"
            return as_sent(self.peeked, KEEP_NEWEST, reason)
        return (None, 0) if preview is None else preview
