"""Providers answer canonical requests: over HTTP in a wire format, or locally (mock)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp

from proxy.canonical import Request, Response, StreamEvent
from proxy.config import ProviderConfig

# The client's vendor headers that reach a provider of the client's own format, by
# format. Nothing else a client sends is passed on: its credentials, cookies, Host and
# proxy headers stay here.
VENDOR_HEADERS: dict[str, frozenset[str]] = {
    "anthropic": frozenset({"anthropic-beta", "anthropic-version"}),
    "openai": frozenset({"openai-organization", "openai-project", "openai-beta"}),
}
# A Responses API client is an OpenAI client.
VENDOR_HEADERS["responses"] = VENDOR_HEADERS["openai"]
# A vendor header's value is at most this many bytes (beta lists, IDs and versions are far
# shorter).
MAX_VENDOR_HEADER_BYTES = 8 * 1024
# Visible ASCII, spaces and tabs: what a header value may be when it is passed on.
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


def vendor_header_error(name: str, value: object) -> str | None:
    """Why ``value`` cannot be passed on as header ``name``, or None when it can."""
    if not isinstance(value, str):
        return f"header {name} must be text"
    if len(value) > MAX_VENDOR_HEADER_BYTES:
        return f"header {name} is longer than {MAX_VENDOR_HEADER_BYTES} bytes"
    if not _HEADER_VALUE.fullmatch(value):
        return f"header {name} may hold only visible ASCII characters, spaces and tabs"
    return None


class Provider(Protocol):
    name: str
    # The wire format it speaks ("openai", "anthropic"), or "mock".
    format: str

    async def complete(self, request: Request, model: str, client_format: str,
                       raw_body: bytes | None = None,
                       plugin_headers: dict[str, str] | None = None
                       ) -> tuple[Response, bytes | None]:
        """Answers a whole request; raises ``UpstreamError`` on failure.

        ``raw_body``, when given, is the client's own body in this provider's format,
        unchanged: it is sent as it is. ``plugin_headers``: what plugins set for the call
        (``ctx.upstream_headers``). Returns the response and, when the provider speaks
        ``client_format``, its body as it came (to pass on as it is)."""
        ...

    def stream(self, request: Request, model: str, client_format: str,
               raw_body: bytes | None = None,
               plugin_headers: dict[str, str] | None = None
               ) -> AsyncIterator[list[StreamEvent]]:
        """Yields the answer as stream events, in non-empty batches of what arrived
        together. ``raw_body`` as for ``complete``. Failures before the first batch are
        raised by the first ``__anext__``, so the caller can still answer with an error
        status."""
        ...


def build_provider(name: str, config: ProviderConfig,
                   session: Callable[[], aiohttp.ClientSession]) -> Provider:
    if config.type == "mock":
        from proxy.providers.mock import MockProvider

        return MockProvider(name, config)
    from proxy.providers.http import HttpProvider

    return HttpProvider(name, config, session)
