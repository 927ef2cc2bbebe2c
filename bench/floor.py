"""The floor: a bare passthrough on the same stack as hookproxy (starlette, uvicorn,
aiohttp with one pooled session), with no parsing and no pipeline. hookproxy cannot be
faster than this; hookproxy / floor is the cost of everything hookproxy adds."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = ""
session: aiohttp.ClientSession | None = None
HEADERS = {"content-type": "application/json"}


async def _stream(url: str, body: bytes) -> AsyncIterator[bytes]:
    assert session is not None
    async with session.post(url, data=body, headers=HEADERS) as upstream:
        async for chunk in upstream.content.iter_any():
            yield chunk


async def passthrough(request: Request) -> Response:
    assert session is not None
    body = await request.body()
    url = UPSTREAM + request.url.path
    if b'"stream":true' in body.replace(b" ", b""):
        return StreamingResponse(_stream(url, body), media_type="text/event-stream")
    async with session.post(url, data=body, headers=HEADERS) as upstream:
        return Response(await upstream.read(), status_code=upstream.status,
                        media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await session.close()


app = Starlette(routes=[Route("/v1/chat/completions", passthrough, methods=["POST"]),
                        Route("/v1/messages", passthrough, methods=["POST"])],
                lifespan=lifespan)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    UPSTREAM = args.upstream
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop")
