"""The HTTP side: starlette routes that decode a wire format, run the pipeline and encode
the answer (or the error) in the client's own format."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route

from proxy import dispatch, responses_api
from proxy import embeddings as embeddings_api
from proxy import pipeline as pipeline_module
from proxy.admin import AdminGuard
from proxy.canonical import Request, StreamEvent, vouch
from proxy.config import Config, ConfigError, available_providers, load_config
from proxy.connections import (
    BROKEN_BODY,
    CLIENT_GONE,
    BodyTimeout,
    ClientGone,
    body_late,
)
from proxy.context import Answered, PipelineError, RequestContext
from proxy.dashboard import dashboard_routes
from proxy.endpoints import (
    JSON,
    count_tokens,
    error_response,
    model_info,
    models_list,
    not_routed,
    vendor_headers,
    when_sent,
    with_headers,
)
from proxy.errors import BadRequest, ProxyError, check_message_count
from proxy.feed import shared_feed
from proxy.formats import anthropic as anthropic_format
from proxy.formats import openai as openai_format
from proxy.front import Front
from proxy.ids import new_request_id
from proxy.lifecycle import PluginApp
from proxy.observe import Observer
from proxy.params import check_parameters
from proxy.pipeline import Pipeline
from proxy.plugins import PluginHost
from proxy.providers import Provider, build_provider
from proxy.routing import Router
from proxy.store import MemoryStore, build_store

log = structlog.get_logger("hookproxy.server")
# What a reload cannot do, said every time it runs.
RELOAD_NOTE = ("plugins installed since the start are found; the code of plugins already "
               "loaded is not re-imported, so changed plugin code needs a restart, as do "
               "[log], [dashboard] and [store] changes")
_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


class Gateway:
    """Everything one running proxy holds: config, providers, router, plugins, pipeline."""

    def __init__(self, config: Config, host: PluginHost | None = None,
                 on_finish: Callable[[RequestContext], None] | None = None) -> None:
        self.observer = Observer(config)
        # The process's one store: limits, the cache, routing's lessons, stored responses
        # and what plugins keep ([store] changes need a restart, like [log]).
        self.store = build_store(config, on_error=self.observer.metrics.store_failed)
        # With a shared store, every worker's and replica's records reach every viewer.
        self.shared_feed = shared_feed(self.observer, self.store, config.store.feed_length)
        # Set under `serve --workers`: tells the supervisor to reload every worker.
        self.reload_all: Callable[[], None] | None = None
        self.guard = AdminGuard(config.auth)
        self._extra_finish = on_finish
        self._session: aiohttp.ClientSession | None = None
        # Kept across reloads (a [responses] change needs a restart).
        self.stored_responses = responses_api.StoredResponses(
            self.store if self.store.shared else MemoryStore(config.responses.store_entries),
            config.responses.store_ttl)
        # The address serve listens on (for the Host check); the CLI sets --host here.
        self.bind_host = config.server.host
        # What plugins share for the life of the process (ctx.app), and why it did not
        # start, if it did not.
        self.app = PluginApp(self.session, self.store, config)
        self.startup_error: str | None = None
        self.plugins_reloaded: asyncio.Task[list[str]] | None = None
        self._apply(config, host)

    @property
    def allowed_hosts(self) -> list[str]:
        return self.config.server.allowed_hosts

    def rejected(self, request_id: str, endpoint: str, client_format: str,
                 error: ProxyError, started_wall: float, started: float) -> None:
        """The record of a request refused before the pipeline, in its place among the
        records of the requests that finished before it."""
        duration = time.perf_counter() - started
        self.pipeline.in_order(functools.partial(
            self.observer.rejected, request_id, endpoint, client_format, error,
            started_wall, started, duration))

    def _apply(self, config: Config, host: PluginHost | None = None) -> None:
        """Builds providers, router, plugins and pipeline for ``config``, then puts them
        in place together; raises ConfigError, changing nothing, if any part fails."""
        usable, skipped = available_providers(config)
        providers: dict[str, Provider] = {
            name: build_provider(name, provider, self.session)
            for name, provider in usable.items()
        }
        router = Router(config, set(providers), skipped, self.store)
        if host is None:
            host = PluginHost()
            host.discover()
            previous: PluginHost | None = getattr(self, "host", None)
            if previous is not None:  # a reload
                host.keep_registered_in_code(previous)
        host.enable(config)
        pipeline = Pipeline(host, router, providers, routing=config.routing,
                            plugin_timeout=config.server.plugin_timeout,
                            classifier_timeout=config.server.classifier_timeout,
                            on_finish=self._finished)
        # Requests in flight keep the objects they started with.
        self.config, self.skipped, self.providers = config, skipped, providers
        self.router, self.host, self.pipeline = router, host, pipeline
        self.app.config = config
        self.guard.configure(config.auth)
        self.observer.metrics.label_names([m.name for m in config.models], config.providers)

    def reload(self, config: Config) -> None:
        """Applies a new config without dropping requests. [log] and [dashboard] changes
        need a restart."""
        self._apply(config)
        log.info("config reloaded", config=config.source, providers=sorted(self.providers),
                 models=self.router.model_names(), plugins=sorted(self.host.enabled),
                 note=RELOAD_NOTE)
        with contextlib.suppress(RuntimeError):  # no event loop: no hooks to run
            self.plugins_reloaded = asyncio.get_running_loop().create_task(
                self.app.reloaded(self.host.active(), self.host))

    async def admin_reload(self, http: HttpRequest) -> HttpResponse:
        try:
            self.reload(load_config(self.config.source))
        except ConfigError as exc:
            log.warning("reload refused", error=str(exc))
            return HttpResponse(_encode({"status": "refused", "error": str(exc)}),
                                status_code=400, media_type=JSON)
        if self.reload_all is not None:
            self.reload_all()  # the other workers too
        answer: dict[str, Any] = {"status": "reloaded", "config": self.config.source,
                                  "note": RELOAD_NOTE}
        if self.plugins_reloaded is not None:
            # Plugins' startup / config_reloaded hooks, which the new config has run.
            failures = await self.plugins_reloaded
            if failures:
                answer["plugin_errors"] = failures
        return HttpResponse(_encode(answer), media_type=JSON)

    def _finished(self, ctx: RequestContext) -> None:
        self.observer.finished(ctx)
        if self._extra_finish is not None:
            self._extra_finish(ctx)

    def session(self) -> aiohttp.ClientSession:
        """The process's one pooled HTTP client session."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300,
                                             keepalive_timeout=60)
            # No cookie jar: every client's requests share this session, and a cookie a
            # provider set for one would go back with the others' (tying them together).
            self._session = aiohttp.ClientSession(connector=connector,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def start(self) -> None:
        self.observer.start()
        if self.shared_feed is not None:
            self.shared_feed.start()

    async def start_plugins(self) -> str | None:
        """Runs the plugins' startup hooks, before anything is served. On a failure, the
        plugins that did start are shut down again, and the reason (naming the plugin) is
        returned and kept in ``startup_error``."""
        failures = await self.app.startup(self.host.active(), self.host)
        if not failures:
            return None
        await self.app.shutdown(self.host, self.config.server.plugin_timeout)
        if self._session is not None:
            await self._session.close()
        self.startup_error = "; ".join(failures)
        return self.startup_error

    async def close(self) -> None:
        await pipeline_module.drain()  # what observes the last requests
        if self.plugins_reloaded is not None:
            await asyncio.wait([self.plugins_reloaded], timeout=self.config.server.plugin_timeout)
        # Background tasks, then each plugin's shutdown hook, while the session is open.
        await self.app.shutdown(self.host, self.config.server.plugin_timeout)
        if self._session is not None:
            await self._session.close()
        if self.shared_feed is not None:
            await self.shared_feed.stop()
        await self.store.close()
        await asyncio.to_thread(self.observer.close)

    # --- endpoints ----------------------------------------------------------------------

    async def chat_completions(self, http: HttpRequest) -> HttpResponse:
        return await self._handle(http, openai_format)

    async def messages(self, http: HttpRequest) -> HttpResponse:
        return await self._handle(http, anthropic_format)

    async def count_tokens(self, http: HttpRequest) -> HttpResponse:
        return await count_tokens(self, http)

    async def responses(self, http: HttpRequest) -> HttpResponse:
        return await responses_api.create(self, http)

    async def response_retrieve(self, http: HttpRequest) -> HttpResponse:
        return await responses_api.retrieve(self, http)

    async def response_delete(self, http: HttpRequest) -> HttpResponse:
        return await responses_api.delete(self, http)

    async def embeddings(self, http: HttpRequest) -> HttpResponse:
        return await embeddings_api.embeddings(self, http)

    async def model(self, http: HttpRequest) -> HttpResponse:
        return model_info(self, http)

    async def not_routed(self, http: HttpRequest, exc: Exception) -> HttpResponse:
        return not_routed(self, http, exc)

    async def models(self, http: HttpRequest) -> HttpResponse:
        return models_list(self, http)

    async def health(self, http: HttpRequest) -> HttpResponse:
        if not self.guard.is_admin(http):
            # With keys configured, what is set up (and which variables are unset) is
            # for the admin only.
            return HttpResponse(_encode({"status": "ok"}), media_type=JSON)
        return HttpResponse(_encode({
            "status": "ok",
            "providers": sorted(self.providers),
            "skipped_providers": self.skipped,
            "models": self.router.model_names(),
        }), media_type=JSON)

    # --- the request path ---------------------------------------------------------------

    async def _handle(self, http: HttpRequest, wire: ModuleType) -> HttpResponse:
        def prepare(body: bytes, request_id: str) -> RequestContext:
            return self.request_context(http, wire, wire.decode_request, body, request_id,
                                        wire.peek_request)

        async def answer(ctx: RequestContext) -> HttpResponse:
            if ctx.stream:
                events = await self.unless_client_leaves(
                    http, ctx, self.pipeline.open_stream(ctx))
                return with_headers(StreamingResponse(
                    self._stream_body(ctx, wire, events), media_type="text/event-stream"), ctx)
            response = await self.unless_client_leaves(http, ctx, self.pipeline.run(ctx))
            content = ctx.raw_response
            if content is None:
                content = wire.encode_response(response, same_format=ctx.same_format)
            return with_headers(HttpResponse(content, media_type=JSON), ctx)

        return await self.serve(http, wire, prepare, answer)

    async def serve(self, http: HttpRequest, wire: ModuleType,
                    prepare: Callable[[bytes, str], RequestContext],
                    answer: Callable[[RequestContext], Awaitable[HttpResponse]]
                    ) -> HttpResponse:
        """An API request from its body to its answer: ``prepare`` turns the body (read
        here, within the caps) into the request's context, ``answer`` runs it. Whatever
        fails is answered in ``wire``'s error format and leaves one record: one the
        pipeline writes once there is a context, one written here before."""
        request_id = new_request_id()
        started, started_wall = time.perf_counter(), time.time()
        ctx: RequestContext | None = None
        try:
            body = await self._read_body(http)
            ctx = prepare(body, request_id)
            return await answer(ctx)
        except ClientDisconnect:
            # The client left while sending its body: nobody to answer, but a record.
            error = ProxyError(499, "The client left while sending the request",
                               code="client_disconnected")
            self.rejected(request_id, http.scope["path"], wire.NAME, error,
                          started_wall, started)
            return when_sent(error_response(wire, error, ctx, request_id), ctx)
        except ProxyError as exc:
            if ctx is None:
                log.warning("bad_request", request_id=request_id, endpoint=http.scope["path"],
                            status=exc.status, error=exc.message)
                self.rejected(request_id, http.scope["path"], wire.NAME, exc,
                              started_wall, started)
            return when_sent(error_response(wire, exc, ctx, request_id), ctx)
        except Exception as exc:
            log.exception("internal_error", request_id=request_id)
            error = ProxyError(500, f"Internal error in hookproxy: {type(exc).__name__}",
                               stage="proxy")
            if ctx is None:
                self.rejected(request_id, http.scope["path"], wire.NAME, error,
                              started_wall, started)
            else:
                # After the pipeline (encoding the answer, say): the record must agree.
                ctx.status = 500
                ctx.error = PipelineError(stage="proxy", status=500, type="internal_error",
                                          message=error.message, exception=exc)
            return when_sent(error_response(wire, error, ctx, request_id), ctx)

    def request_context(self, http: HttpRequest, wire: ModuleType,
                        decode: Callable[[bytes], Request], body: bytes,
                        request_id: str, peek: Callable[[bytes], tuple[Request, int] | None]
                        | None = None) -> RequestContext:
        """Decodes ``body`` with ``decode`` into the context the pipeline runs on, with
        the checks every API request passes; raises ``ProxyError`` for the client's
        mistakes.

        With ``peek``, a request that no plugin or classifier will see has only its
        top-level fields decoded: its messages are read only if something asks for them
        (a target that needs the request re-encoded), and otherwise go as they came."""
        headers = vendor_headers(http.scope["headers"], wire.NAME)
        limit = self.config.server.max_messages

        def decoded() -> Request:
            try:
                request = decode(body)
            except (TypeError, AttributeError, ValueError, KeyError) as exc:
                # A shape the decoder did not foresee is still the client's error.
                raise BadRequest(f"Invalid request: {type(exc).__name__}: {exc}") from None
            check_message_count(len(request.messages), limit)
            request.headers = headers
            if dispatch.CHECK_REPORTS:
                dispatch.check_decoded(request)
            vouch(request)
            return request

        # A request cannot switch off what the config enables: with plugins or
        # classifiers there, it will be read whole.
        bare = not (self.host.enabled or self.host.enabled_classifiers)
        peeked = peek(body) if peek is not None and bare else None
        if peeked is None:
            request = decoded()
        else:
            request, count = peeked
            check_message_count(count, limit)
            request.headers = headers
        check_parameters(request, wire.NAME)
        own_field = request.extra.pop("hookproxy", None)
        plugins, classifiers, client_set = self.host.for_request(own_field)
        ctx = RequestContext(
            request, request_id=request_id, endpoint=http.scope["path"],
            client_format=wire.NAME, raw_headers=http.scope["headers"],
            plugin_settings=plugins, classifier_settings=classifiers)
        if peeked is not None:
            def rest() -> Request:
                request = decoded()
                request.extra.pop("hookproxy", None)  # read above
                return request

            if plugins or classifiers:
                ctx.request = rest()
            else:
                ctx.defer_decoding(rest, body)
        ctx.client_classifiers = client_set
        ctx.app = self.app
        ctx.answered = Answered()
        ctx.body_bytes = len(body)
        if own_field is None:
            ctx.raw_body = body
        return ctx

    async def unless_client_leaves(self, http: HttpRequest, ctx: RequestContext,
                                   work: Awaitable[T]) -> T:
        """Runs ``work`` (the pipeline up to the answer, or up to a stream's first event);
        if the client disconnects first, it is cancelled, and with it the provider call,
        and the record says the client left."""
        gone: ClientGone | None = http.scope.get(CLIENT_GONE)
        task = asyncio.current_task()
        if gone is None or gone.gone or task is None:
            # Not under hookproxy's own protocol (or gone already): a task waits for the
            # disconnect on receive().
            return await self._unless_client_leaves_watching(http, ctx, work)
        left = False

        def leave() -> None:
            nonlocal left
            left = True
            # Said before cancelling: the record is written while the pipeline unwinds.
            _said_left(ctx)
            task.cancel()

        gone.watch(leave)
        try:
            result = await work
        except asyncio.CancelledError:
            if not left:
                raise
            raise _left_error() from None
        finally:
            gone.unwatch()
            if left:  # the cancellation was ours, and is over
                task.uncancel()
        if left:  # the work went on through its cancellation
            raise _left_error()
        return result

    async def _unless_client_leaves_watching(self, http: HttpRequest, ctx: RequestContext,
                                             work: Awaitable[T]) -> T:
        run = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnect(http.receive))
        try:
            await asyncio.wait((run, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not run.done():
            # Said before cancelling: the record is written while the pipeline unwinds.
            _said_left(ctx)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            raise _left_error()
        return run.result()

    async def _read_body(self, http: HttpRequest) -> bytes:
        # Required, and exactly JSON: a web page can send text/plain or a form to a
        # local proxy without the browser asking first, but not application/json.
        content_type = length = None
        for name, value in http.scope["headers"]:  # the first of each, as starlette's
            if name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"content-length" and length is None:
                length = value.decode("latin-1")
        if content_type is None:
            raise ProxyError(415, "Missing Content-Type: send application/json",
                             code="unsupported_media_type")
        if content_type != JSON and content_type.split(";", 1)[0].strip().lower() != JSON:
            raise ProxyError(415, f"Unsupported content type {_shown(content_type)}: send "
                                  "application/json", code="unsupported_media_type")
        limit = self.config.server.max_body_bytes
        if length and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        # As starlette's Request.body(), read here without its async generator: counted
        # as it comes (a body without a Content-Length can be any size).
        receive = http.receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        broken: ProxyError | None = http.scope.get(BROKEN_BODY)
        if broken is not None:  # the body ended where its framing broke
            raise broken
        return body

    async def _stream_body(self, ctx: RequestContext, wire: ModuleType,
                           events: AsyncIterator[list[StreamEvent]]) -> AsyncIterator[bytes]:
        encoder = wire.StreamEncoder(ctx.request_fields)
        encode = encoder.encode
        try:
            async for batch in events:
                yield b"".join([encode(event) for event in batch])
        except ProxyError as exc:
            log.warning("stream_failed", request_id=ctx.request_id, status=exc.status,
                        error=exc.message, chunks=ctx.stream_chunks)
            yield encoder.encode_error(exc)
        except Exception as exc:
            log.exception("internal_error", request_id=ctx.request_id)
            yield encoder.encode_error(ProxyError(500, f"Internal error in hookproxy: "
                                                       f"{type(exc).__name__}"))
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()  # type: ignore[attr-defined]


async def _disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _said_left(ctx: RequestContext) -> None:
    ctx.status = 499
    ctx.error = PipelineError(stage="stream" if ctx.stream else "request", status=499,
                              type="client_disconnected",
                              message="The client left before the answer was ready")


def _left_error() -> ProxyError:
    return ProxyError(499, "The client left before the answer was ready",
                      code="client_disconnected")


async def _no_icon(http: HttpRequest) -> HttpResponse:
    return HttpResponse(status_code=204, headers={"cache-control": "max-age=86400"})


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"Request body is larger than {limit} bytes",
                      code="request_too_large")


def _shown(value: str) -> str:
    return repr(value[:100])


class GatewayServer(uvicorn.Server):
    """uvicorn, plus: live dashboard streams end when shutdown begins (uvicorn would
    otherwise wait for them to finish, which they never do)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Plugins start before the socket accepts anything; if one cannot, nothing is
        # served and the reason is in gateway.startup_error.
        if await self.gateway.start_plugins() is not None:
            self.should_exit = True
            return
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.observer.feed.close()
        await super().shutdown(sockets)


def create_app(gateway: Gateway) -> Front:
    """The ASGI application: starlette's, behind ``proxy.front.Front``."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    # Endpoints that answer every error themselves, in the client's format
    # (Gateway.serve): proxy.front.Front calls them without starlette's routing.
    api_endpoints = [gateway.chat_completions, gateway.messages, gateway.count_tokens,
                     gateway.responses, gateway.embeddings]
    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/messages", gateway.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", gateway.count_tokens, methods=["POST"]),
        Route("/v1/responses", gateway.responses, methods=["POST"]),
        Route("/v1/responses/{response_id}", gateway.response_retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", gateway.response_delete, methods=["DELETE"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", gateway.model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        *dashboard_routes(gateway.observer, gateway.config.dashboard.keepalive, gateway.guard),
        Route("/admin/reload", gateway.guard.protect(gateway.admin_reload), methods=["POST"]),
        # Browsers ask for it with the dashboard: no icon, and no record of a 404 for it.
        Route("/favicon.ico", _no_icon, methods=["GET"]),
    ]
    # A path nothing serves, or a method a path does not take: an error in the client's
    # own format, and a record. (A body too slow for an API endpoint is answered there.)
    handlers: dict[Any, Any] = {404: gateway.not_routed, 405: gateway.not_routed,
                                BodyTimeout: body_late}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    return Front(app, gateway, routes, api_endpoints, gateway.config.server.body_timeout)
