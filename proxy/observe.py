"""Where every finished request goes: one record, encoded once, to the JSONL log, the
live feed and the metrics."""

from __future__ import annotations

import time

import msgspec

from proxy.config import Config
from proxy.context import RequestContext
from proxy.errors import ProxyError, error_type
from proxy.feed import Feed
from proxy.logwriter import LogWriter
from proxy.metrics import Metrics
from proxy.record import ErrorInfo, Record, build_record, rejected_record

_encode = msgspec.json.Encoder().encode


class Observer:
    def __init__(self, config: Config) -> None:
        self.config = config
        log = config.log
        self.writer = (LogWriter(log.path, max_bytes=log.max_bytes, keep=log.keep,
                                 queue_size=log.queue_size) if log.path else None)
        self.feed = Feed(held=config.dashboard.held,
                         subscriber_queue=config.dashboard.subscriber_queue)
        self.metrics = Metrics(lambda: self.writer.dropped if self.writer else 0)

    def start(self) -> None:
        import asyncio

        # The server's event loop, for whoever needs to reach in from another thread.
        self.loop = asyncio.get_running_loop()
        if self.writer is not None:
            self.writer.start()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def finished(self, ctx: RequestContext) -> None:
        record = build_record(ctx, bodies=self.config.log.bodies,
                              limit=self.config.log.truncate_chars)
        self.publish(record)

    def rejected(self, request_id: str, endpoint: str, client_format: str, error: ProxyError,
                 started_wall: float, started: float) -> None:
        """A request that failed before it could be decoded still leaves its record."""
        info = ErrorInfo(type=error.code or error_type(error.status), message=error.message,
                         stage=error.stage)
        self.publish(rejected_record(request_id, endpoint, client_format, error.status, info,
                                     started_wall, time.perf_counter() - started))

    def publish(self, record: Record) -> None:
        data = _encode(record)
        if self.writer is not None:
            self.writer.submit(data + b"\n")
        self.feed.publish(data)
        self.metrics.observe(record)
