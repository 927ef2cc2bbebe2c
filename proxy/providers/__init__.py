"""Providers answer canonical requests: over HTTP in a wire format, or locally (mock)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp

from proxy.canonical import Request, Response, StreamEvent
from proxy.config import ProviderConfig


class Provider(Protocol):
    name: str
    # The wire format it speaks ("openai", "anthropic"), or "mock".
    format: str

    async def complete(self, request: Request, model: str, client_format: str,
                       raw_body: bytes | None = None) -> tuple[Response, bytes | None]:
        """Answers a whole request; raises ``UpstreamError`` on failure.

        ``raw_body``, when given, is the client's own body in this provider's format,
        unchanged: it is sent as it is. Returns the response and, when the provider
        speaks ``client_format``, its body as it came (to pass on as it is)."""
        ...

    def stream(self, request: Request, model: str, client_format: str
               ) -> AsyncIterator[list[StreamEvent]]:
        """Yields the answer as stream events, in non-empty batches of what arrived
        together. Failures before the first batch are raised by the first ``__anext__``, so
        the caller can still answer with an error status."""
        ...


def build_provider(name: str, config: ProviderConfig,
                   session: Callable[[], aiohttp.ClientSession]) -> Provider:
    if config.type == "mock":
        from proxy.providers.mock import MockProvider

        return MockProvider(name, config)
    from proxy.providers.http import HttpProvider

    return HttpProvider(name, config, session)
