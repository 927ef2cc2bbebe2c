"""``GET /dashboard`` (the page in static/), ``GET /dashboard/events`` (SSE) and
``GET /metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from proxy.admin import AdminGuard
from proxy.feed import Feed
from proxy.observe import Observer

STATIC = Path(__file__).resolve().parent.parent / "static"


def _event(entry: tuple[int, bytes]) -> bytes:
    return b"id: %d\nevent: request\ndata: %s\n\n" % entry


async def _events(feed: Feed, last_id: int, keepalive: float, request: Request
                  ) -> AsyncIterator[bytes]:
    # Subscribing and reading the backlog with no await in between: nothing is missed
    # and nothing comes twice.
    subscriber = feed.subscribe()
    backlog = feed.since(last_id)
    try:
        yield b"retry: 1000\n: connected\n\n"
        for entry in backlog:
            yield _event(entry)
        while not subscriber.dropped:
            try:
                entry = await asyncio.wait_for(subscriber.queue.get(), keepalive)
            except TimeoutError:
                # Writing to a client that left raises nothing here: ask.
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            if entry[0]:
                yield _event(entry)
    finally:
        feed.unsubscribe(subscriber)


def dashboard_routes(observer: Observer, keepalive: float, guard: AdminGuard
                     ) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def events(request: Request) -> Response:
        raw = request.headers.get("last-event-id") or request.query_params.get("last_id", "0")
        last_id = int(raw) if raw.isdigit() else 0
        return StreamingResponse(_events(observer.feed, last_id, keepalive, request),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache",
                                          "x-accel-buffering": "no"})

    async def metrics(request: Request) -> Response:
        return Response(observer.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/dashboard", guard.protect(page, page=True), methods=["GET"]),
        Route("/dashboard/events", guard.protect(events), methods=["GET"]),
        Mount("/dashboard/static", app=StaticFiles(directory=STATIC), name="static"),
        Route("/metrics", guard.protect(metrics), methods=["GET"]),
    ]
