"""Providers reached over HTTP: OpenAI-compatible servers and Anthropic."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec

from proxy.canonical import Request, Response, StreamEvent
from proxy.config import ProviderConfig
from proxy.errors import UpstreamError, upstream_error
from proxy.formats import FORMATS
from proxy.sse import iter_sse

ANTHROPIC_VERSION = "2023-06-01"


def _error_message(body: bytes) -> str:
    """The ``error.message`` both APIs put in an error body, or the body's start."""
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return body[:500].decode("utf-8", "replace")


class HttpProvider:
    def __init__(self, name: str, config: ProviderConfig,
                 session: Callable[[], aiohttp.ClientSession]) -> None:
        self.name = name
        self.format: str = config.type
        self.config = config
        self._session = session
        self._wire = FORMATS[config.type]
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        headers = {"content-type": "application/json"}
        if config.type == "anthropic":
            self.url = f"{config.base_url}/v1/messages"
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                headers["x-api-key"] = key
        else:
            self.url = f"{config.base_url}/chat/completions"
            if key:
                headers["authorization"] = f"Bearer {key}"
        headers.update(config.headers)
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(total=config.timeout)
        # A stream may run long; what is bounded is the wait for each next byte.
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout, sock_read=config.timeout)

    def _body(self, request: Request, model: str, client_format: str) -> bytes:
        same = client_format == self.format
        if self.format == "anthropic":
            return self._wire.encode_request(
                request, model, same_format=same,
                default_max_tokens=self.config.default_max_tokens)
        return self._wire.encode_request(request, model, same_format=same)

    def _failure(self, exc: BaseException, answering: bool = False) -> UpstreamError:
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            return UpstreamError(504, f"Provider {self.name} timed out after "
                                      f"{self.config.timeout:g}s", code="upstream_timeout")
        if answering:
            return UpstreamError(502, f"Provider {self.name} ended the answer before it was "
                                      f"complete: {exc}", code="upstream_cut")
        return UpstreamError(502, f"Provider {self.name} is unreachable: {exc}",
                             code="upstream_unreachable")

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        body = await response.read()
        message = f"Provider {self.name} returned {response.status}: {_error_message(body)}"
        raise upstream_error(response.status, message, response.headers.get("retry-after"))

    async def complete(self, request: Request, model: str, client_format: str,
                       raw_body: bytes | None = None) -> tuple[Response, bytes | None]:
        body = raw_body if raw_body is not None else self._body(request, model, client_format)
        try:
            async with self._session().post(self.url, data=body, headers=self.headers,
                                            timeout=self.timeout) as response:
                await self._raise_for_status(response)
                payload = await response.read()
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from None
        return (self._wire.decode_response(payload),
                payload if client_format == self.format else None)

    async def stream(self, request: Request, model: str, client_format: str
                     ) -> AsyncIterator[list[StreamEvent]]:
        body = self._body(request, model, client_format)
        decoder: Any = self._wire.StreamDecoder()
        answering = False
        try:
            async with self._session().post(self.url, data=body, headers=self.headers,
                                            timeout=self.stream_timeout) as response:
                await self._raise_for_status(response)
                answering = True
                async for events in iter_sse(response.content.iter_any()):
                    batch: list[StreamEvent] = []
                    try:
                        for event, data in events:
                            batch.extend(decoder.feed(event, data))
                            if decoder.ended:
                                break
                    except UpstreamError:
                        if batch:  # what came before the bad event still goes out
                            yield batch
                        raise
                    if batch:
                        yield batch
                    if decoder.ended:
                        return
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, answering) from None
        rest = decoder.close()
        if rest:
            yield rest
