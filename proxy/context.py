"""What every hook receives: one RequestContext per request."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from proxy.canonical import Request, Response
from proxy.errors import ProxyError, is_error_status


class Reject(ProxyError):
    """Raised by a plugin to refuse a request with a status and a message, which the
    client receives in its own error format."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        plugin = None
        if not is_error_status(status):
            # Named by the module that raised it: the plugin's author has a bug to fix.
            plugin = sys._getframe(1).f_globals.get("__name__", "?")
            message = (f"Plugin {plugin} rejected the request with status {status!r}, which "
                       f"is not an error status (400-599); its message: {message}")
            status, code = 500, "plugin_error"
        super().__init__(status, message, code=code, stage="plugin", plugin=plugin,
                         headers=headers)


class PipelineError(msgspec.Struct, omit_defaults=True):
    """One failure, as observers and the log see it."""

    stage: str
    message: str
    status: int = 500
    plugin: str | None = None
    type: str = ""
    exception: BaseException | None = None


class Attempt(msgspec.Struct, omit_defaults=True):
    """One call to a provider; ``status`` 0 means it gave no HTTP answer."""

    provider: str
    model: str
    status: int = 0
    error: str | None = None
    latency_ms: float = 0.0


class RequestContext:
    """The request's state as it moves through the stages.

    ``request`` is the canonical request and may be changed in place; ``response`` is set
    once there is one. ``tags`` come from the classifiers. ``scratch`` is a per-request
    dict plugins share among their hooks. ``timings`` maps stage names to seconds.

    A request that no plugin or classifier takes part in is decoded only as far as its
    top-level fields (``request_fields``); reading ``request`` decodes the rest.
    """

    def __init__(self, request: Request, *, request_id: str, endpoint: str,
                 client_format: str, caller: str | None = None,
                 headers: dict[str, str] | None = None,
                 plugin_settings: dict[str, dict[str, Any]] | None = None,
                 classifier_settings: dict[str, dict[str, Any]] | None = None) -> None:
        self._request = request
        # Decodes the rest of the request when something first reads ``request``.
        self._decode_rest: Callable[[], Request] | None = None
        self.undecoded_body = b""
        self.request_id = request_id
        self.endpoint = endpoint
        self.client_format = client_format
        self.requested_model = request.model
        self.caller = caller
        self.headers = headers or {}
        self.response: Response | None = None
        self.tags: list[str] = []
        self.scratch: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.force_provider: str | None = None
        self.force_model: str | None = None
        # The route rule's target and the model group routing settled on.
        self.route: str | None = None
        self.model_group: str | None = None
        # The plugins taking part in this request -> their settings for it.
        # (the same mapping object for most requests: hook lookups are cached by it)
        self.plugin_settings: dict[str, dict[str, Any]] = (
            {} if plugin_settings is None else plugin_settings)
        self.classifier_settings: dict[str, dict[str, Any]] = (
            {} if classifier_settings is None else classifier_settings)
        # Classifiers whose settings this request changed, and the tags only they gave:
        # route rules ignore those tags unless a rule says allow_client_tags.
        self.client_classifiers: frozenset[str] = frozenset()
        self.client_tags: set[str] = set()
        # plugin name -> what it did: modified, short_circuit, rejected, failed
        self.plugin_actions: dict[str, str] = {}
        self.classifier_errors: dict[str, str] = {}
        self.errors: list[PipelineError] = []
        # stream_chunk failures per plugin (reported once, counted), and the plugins whose
        # traceback is in the app log already.
        self.chunk_failures: dict[str, int] = {}
        # Set by the server once the answer has gone out: what observes the request
        # (on_error, request_end, the record) waits for it. None: nobody will set it.
        self.answered: asyncio.Event | None = None
        self.logged_failures: set[str] = set()
        self.attempts: list[Attempt] = []
        self.provider: str | None = None
        self.model: str | None = None
        self.provider_format: str | None = None
        # The answering target's prices per million tokens: input, output, cache read,
        # cache write.
        self.price: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self.short_circuited_by: str | None = None
        self.status = 200
        self.error: PipelineError | None = None
        self.stream_chunks = 0
        # The client's body as it came (None once it no longer stands for the request),
        # and the provider's answer as it came when it is in the client's format.
        self.raw_body: bytes | None = None
        # The size of the client's body as it came.
        self.body_bytes = 0
        self.raw_response: bytes | None = None
        # For a stream that broke after it began: how many chunks had gone out.
        self.failed_at_chunk: int | None = None

    @property
    def request(self) -> Request:
        if self._decode_rest is not None:
            self._request = self._decode_rest()
            self._decode_rest = None
        return self._request

    @request.setter
    def request(self, request: Request) -> None:
        self._request = request
        self._decode_rest = None

    def defer_decoding(self, decode: Callable[[], Request], body: bytes) -> None:
        """Leaves the request as it is (its top-level fields) until something reads
        ``request``, which then becomes what ``decode`` returns; ``body`` is what it
        decodes, for the record meanwhile."""
        self._decode_rest = decode
        self.undecoded_body = body

    @property
    def request_fields(self) -> Request:
        """The request's top-level fields (model, stream, parameters, headers) without
        decoding the rest: its messages, system and tools may be empty here if nothing has
        read ``request`` yet."""
        return self._request

    @property
    def decoded_request(self) -> Request | None:
        """The request if it has been decoded whole, else None (``undecoded_body`` is then
        the body it comes from)."""
        return None if self._decode_rest is not None else self._request

    @property
    def stream(self) -> bool:
        return self._request.stream

    @property
    def same_format(self) -> bool:
        return self.provider_format == self.client_format

    @property
    def cost(self) -> float:
        """What the response cost at the configured prices (0 without a response)."""
        if self.response is None:
            return 0.0
        usage = self.response.usage
        read, write = usage.cache_read_tokens, usage.cache_write_tokens
        uncached = max(usage.input_tokens - read - write, 0)
        input_price, output_price, read_price, write_price = self.price
        return (uncached * input_price + usage.output_tokens * output_price
                + read * read_price + write * write_price) / 1e6

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
