"""``GET /dashboard`` (the page in static/), ``GET /dashboard/events`` (SSE) and
``GET /metrics``."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from proxy.admin import SECURITY_HEADERS, AdminGuard
from proxy.feed import Feed
from proxy.observe import Observer

# Media types by suffix, fixed here rather than read from the machine's mime.types.
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (static/ in the repository, ``proxy.static`` once installed),
    read once: name -> (content, media type). A few KB; served from memory."""
    assets: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("proxy.static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and not item.name.startswith(("_", ".")) and suffix != ".py":
            media = _TYPES.get(suffix) or mimetypes.guess_type(item.name)[0] or "text/plain"
            assets[item.name] = (item.read_bytes(), media)
    return assets


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
        queue = subscriber.queue
        while not subscriber.dropped:
            try:
                async with asyncio.timeout(keepalive):
                    entry = await queue.get()
            except TimeoutError:
                # Writing to a client that left raises nothing here: ask.
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            # What else has arrived goes out in the same write.
            entries = [entry]
            while not queue.empty():
                entries.append(queue.get_nowait())
            events = b"".join([_event(entry) for entry in entries if entry[0]])
            if events:
                yield events
    finally:
        feed.unsubscribe(subscriber)


def dashboard_routes(observer: Observer, keepalive: float, guard: AdminGuard
                     ) -> list[BaseRoute]:
    assets = load_assets()

    async def page(request: Request) -> Response:
        content, media = assets["index.html"]
        session = getattr(request.state, "admin_session", None)
        if session is not None:
            # For the page's own admin POSTs (x-csrf-token); the cookie alone is not enough.
            content = content.replace(
                b"</head>", b'<meta name="hookproxy-csrf" content="%s">\n</head>'
                % session.csrf.encode(), 1)
        return Response(content, media_type=media, headers=SECURITY_HEADERS)

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        return Response(found[0], media_type=found[1],
                        headers={**SECURITY_HEADERS, "cache-control": "no-cache"})

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
        Route("/dashboard/login", guard.login, methods=["POST"]),
        Route("/dashboard/logout", guard.logout, methods=["POST"]),
        Route("/dashboard/events", guard.protect(events), methods=["GET"]),
        Route("/dashboard/static/{name}", asset, methods=["GET"]),
        Route("/metrics", guard.protect(metrics), methods=["GET"]),
    ]
