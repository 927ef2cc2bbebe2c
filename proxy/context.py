"""What every hook receives: one RequestContext per request."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from proxy.canonical import Message, Request, Response, distrust, forget_printed
from proxy.dispatch import current_plugin
from proxy.errors import ProxyError, is_error_status
from proxy.headers import HeaderMap

if TYPE_CHECKING:
    import aiohttp

    from proxy.lifecycle import PluginApp
    from proxy.routing import Target
    from proxy.store import Store

_log = structlog.get_logger("hookproxy.plugin")
_encode = msgspec.json.Encoder().encode
# What one request's annotations may hold, as JSON, all plugins together; past it, further
# ones are counted (``annotations_dropped`` in the record), not kept.
MAX_ANNOTATION_BYTES = 16 * 1024

# Called once a request's targets are known, before the first provider call, with the
# targets it may be answered by (none when a plugin answered it): where limits reserve.
Admission = Callable[["RequestContext", "Sequence[Target]"], Awaitable[None]]


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


class Answered:
    """Set, on the event loop, once a request's answer has gone out. Like an
    ``asyncio.Event``, plus callbacks run as it is set: most requests have nothing to
    wait for it but their record, which needs no task of its own."""

    __slots__ = ("_callbacks", "_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._callbacks: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        if self._is_set:
            return
        self._is_set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        callbacks, self._callbacks, self._waiters = self._callbacks, [], []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once this is set (at once if it is)."""
        if self._is_set:
            callback()
        else:
            self._callbacks.append(callback)

    async def wait(self) -> None:
        if self._is_set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class RequestContext:
    """The request's state as it moves through the stages.

    ``request`` is the canonical request and may be changed in place; ``response`` is set
    once there is one. ``tags`` come from the classifiers. ``scratch`` is a per-request
    dict plugins share among their hooks. ``timings`` maps stage names to seconds.

    A request that no plugin or classifier takes part in is decoded only as far as its
    top-level fields (``request_fields``); reading ``request`` decodes the rest.
    """

    # Slots: a context is made per request, and with 57 attributes in a plain __dict__
    # (past what CPython shares between instances) each was a dict insertion and a few
    # resizes. ``__dict__`` stays for what a plugin sets on the context itself.
    __slots__ = ("__dict__", "_annotation_bytes", "_annotation_sizes", "_decode_rest",
                 "_headers", "_headers_sent", "_raw_headers", "_request", "_response_headers",
                 "_upstream_headers", "admissions", "annotations", "annotations_dropped",
                 "answered", "app", "attempts", "body_bytes", "caller", "changes",
                 "chunk_failures", "classifier_errors", "classifier_settings",
                 "client_classifiers", "client_format", "client_tags", "endpoint", "error",
                 "errors", "failed_at_chunk", "force_model", "force_provider", "limits",
                 "logged_failures", "model", "model_allow_lists", "model_group",
                 "plugin_actions", "plugin_settings", "price", "provider",
                 "provider_format", "raised", "raw_body", "raw_response", "request_id",
                 "requested_model", "response", "route", "scratch", "short_circuited_by",
                 "started", "started_wall", "status", "stream_chunks", "tags", "tenant",
                 "timings", "undecoded_body", "usage_estimated")

    def __init__(self, request: Request, *, request_id: str, endpoint: str,
                 client_format: str, caller: str | None = None,
                 headers: dict[str, str] | None = None,
                 plugin_settings: dict[str, dict[str, Any]] | None = None,
                 classifier_settings: dict[str, dict[str, Any]] | None = None,
                 raw_headers: Sequence[tuple[bytes, bytes]] | None = None) -> None:
        self._request = request
        # Decodes the rest of the request when something first reads ``request``.
        self._decode_rest: Callable[[], Request] | None = None
        self.undecoded_body = b""
        self.request_id = request_id
        self.endpoint = endpoint
        self.client_format = client_format
        self.requested_model = request.model
        self.caller = caller
        # Whose data (cache entries) this request may see: None for the caller's own;
        # "" for the pool shared by callers who opt into sharing.
        self.tenant: str | None = None
        # ``headers``, or the ASGI scope's headers it is made from when first read.
        self._headers = headers if headers is not None or raw_headers is not None else {}
        self._raw_headers = raw_headers or ()
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
        self.answered: Answered | None = None
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
        # The process's shared pieces (session, store, background tasks); set by the server.
        self.app: PluginApp | None = None
        # plugin -> {key: JSON value}: what plugins put in the record (``annotate``).
        self.annotations: dict[str, dict[str, Any]] = {}
        self.annotations_dropped = 0
        self._annotation_sizes: dict[tuple[str, str], int] = {}
        self._annotation_bytes = 0
        # Made on first use: most requests have no plugin headers.
        self._response_headers: HeaderMap | None = None
        self._headers_sent = False
        self._upstream_headers: HeaderMap | None = None
        # Limits to pass before the provider is called (see ``Admission``), and what they
        # held and charged (a proxy.limits.Ledger, for the record).
        self.admissions: list[Admission] = []
        self.limits: Any = None
        # How many times a plugin said it changed the request or response (``changed``).
        self.changes = 0
        # The error the request failed with, as raised (its traceback is dropped once the
        # request is over: its frames hold this context).
        self.raised: BaseException | None = None
        # The usage is hookproxy's estimate: the provider did not finish reporting it.
        self.usage_estimated: bool = False
        # Model globs the answering target must match, each with whom it is for: every
        # list must allow the target (see ``allow_models``).
        self.model_allow_lists: list[tuple[str, tuple[str, ...]]] = []

    @property
    def headers(self) -> dict[str, str]:
        """The client's request headers by lower-case name; a name sent more than once has
        its first value."""
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
            for name, value in self._raw_headers:
                key = name.decode("latin-1")
                if key not in headers:
                    headers[key] = value.decode("latin-1")
        return headers

    @headers.setter
    def headers(self, headers: dict[str, str]) -> None:
        self._headers = headers

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

    def changed(self, *messages: Message) -> None:
        """Says that the running plugin changed the request (in post_response, the
        response), naming each message it changed in place. A hook implementation marked
        ``@reports_changes`` must call this for every change it makes; for others it is
        harmless. A message the plugin replaced with a new one, or added, need not be named:
        only a message decoded from the client's body can go out as it came."""
        self.changes += 1
        for message in messages:
            forget_printed(message)

    def may_have_changed(self) -> None:
        """A hook that does not report its changes was given this request (see
        ``proxy.dispatch.reports_changes``)."""
        request = self.decoded_request
        if request is not None:
            distrust(request)

    def allow_models(self, patterns: Sequence[str], owner: str) -> None:
        """Narrows the targets that may answer this request to those whose model matches
        one of ``patterns`` (globs on the target's model name or ``provider/model``);
        ``owner`` names who asks, for the 403 (``"key 'team-a'"``). Calls only ever
        narrow: a target must pass every list."""
        self.model_allow_lists.append((owner, tuple(patterns)))

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

    # --- what plugins reach through the context -------------------------------------------

    def _app(self) -> PluginApp:
        if self.app is None:
            raise RuntimeError("this request context belongs to no running proxy")
        return self.app

    @property
    def session(self) -> aiohttp.ClientSession:
        """The process's one pooled ``aiohttp.ClientSession``: use it, never close it."""
        return self._app().session

    @property
    def store(self) -> Store:
        """The process's ``proxy.store.Store`` (the one the built-in plugins use): prefix
        your keys with your plugin's name."""
        return self._app().store

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Runs ``work`` in the background: it never delays the answer, is awaited at
        shutdown (bounded), and its errors are logged with the plugin and request id."""
        return self._app().spawn(work, request_id=self.request_id)

    @property
    def log(self) -> Any:
        """A structlog logger bound to this request's id and the calling plugin's name."""
        return _log.bind(request_id=self.request_id, plugin=current_plugin.get())

    @property
    def response_headers(self) -> HeaderMap:
        """Headers for the client's answer (its error too). A stream's headers go out with
        its first event: set them before (request_start, pre_routing, alongside_call)."""
        if self._response_headers is None:
            self._response_headers = HeaderMap("response")
            self._response_headers.sent = self._headers_sent
        return self._response_headers

    @property
    def upstream_headers(self) -> HeaderMap:
        """Headers for the provider call (every attempt and fallback). Credentials and
        framing headers are refused; a header the operator configured wins."""
        if self._upstream_headers is None:
            self._upstream_headers = HeaderMap("upstream")
        return self._upstream_headers

    def upstream_header_items(self) -> dict[str, str] | None:
        """What plugins set for the provider, or None."""
        return dict(self._upstream_headers) if self._upstream_headers else None

    def answer_headers(self) -> dict[str, str]:
        """What plugins set for the client; no more can be set after this."""
        self._headers_sent = True
        headers = self._response_headers
        if headers is None:
            return {}
        headers.sent = True
        return dict(headers)

    def annotate(self, key: str, value: Any) -> None:
        """Puts ``value`` (anything JSON can hold) in the record under the calling
        plugin's name and ``key``: the dashboard's detail view shows it. Values under
        secret-looking keys are redacted; past ``MAX_ANNOTATION_BYTES`` for the request,
        further annotations are counted, not kept."""
        if not isinstance(key, str) or not key or len(key) > 100:
            raise ValueError("an annotation's key must be text of 1-100 characters")
        encoded = _encode(value)  # TypeError for what JSON cannot hold
        plugin = current_plugin.get() or "?"
        size = len(encoded) + len(key)
        used = self._annotation_bytes - self._annotation_sizes.get((plugin, key), 0)
        if used + size > MAX_ANNOTATION_BYTES:
            self.annotations_dropped += 1
            return
        self._annotation_sizes[(plugin, key)] = size
        self._annotation_bytes = used + size
        # A copy: what the plugin changes later is not what it annotated.
        self.annotations.setdefault(plugin, {})[key] = msgspec.json.decode(encoded)
