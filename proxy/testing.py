"""Testing hookproxy plugins through a real proxy: for plugin authors, from an installed
hookproxy (no copy of its test harness needed).

``FakeProvider`` is an upstream on a loopback port that speaks the OpenAI Chat Completions
and Anthropic Messages wire formats, streaming included, and records what reached it;
``Service`` serves any aiohttp handlers on loopback (an outside service a plugin calls).
``Proxy`` runs hookproxy itself on another loopback port, in this process, with the plugins
you give it (and those installed), routed to the fake provider, and hands out the
official SDK clients::

    from proxy.testing import Proxy

    with Proxy(plugins={"mine": my_plugin}, settings={"mine": {"limit": 3}}) as proxy:
        reply = proxy.openai().chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
        assert proxy.provider.last["messages"][-1]["content"] == "hi"

The models are ``gpt-fake`` (an OpenAI-format provider) and ``claude-fake`` (an
Anthropic-format one), so one test can cross formats. Installing hookproxy also installs
the pytest fixtures ``hookproxy`` and ``hookproxy_provider`` (``proxy.pytest_plugin``).
The SDK clients need ``pip install "hookproxy[testing]"``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from proxy import dispatch
from proxy.config import parse_config
from proxy.connections import uvicorn_config
from proxy.context import RequestContext
from proxy.lifecycle import PluginApp
from proxy.plugins import PluginHost
from proxy.server import Gateway, GatewayServer, create_app

OPENAI_MODEL = "gpt-fake"
ANTHROPIC_MODEL = "claude-fake"


class Service:
    """A small aiohttp app on a loopback port, in a thread of its own: an outside service
    a plugin calls (a moderation API, a quota server) in a test. ``routes`` maps paths to
    aiohttp handlers (``async def handler(request) -> web.Response``); ``"GET /path"``
    for another method than POST."""

    def __init__(self, routes: Mapping[str, Callable[[web.Request], Awaitable[Any]]]) -> None:
        self.routes = dict(routes)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hookproxy-test-service")

    def start(self) -> Service:
        app = web.Application()
        for route, handler in self.routes.items():
            method, _, path = route.rpartition(" ")
            app.router.add_route(method or "POST", path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        self._thread.start()
        self._call(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._call(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FakeProvider(Service):
    """A provider for tests, on a loopback port, speaking both wire formats.

    It answers ``reply`` (by default ``echo: <the last user text>``) with fixed usage, as
    a stream when asked to (a word an event, ``chunk_delay`` seconds apart), after
    ``delay`` seconds, or with an error of ``status`` in the API's own format.
    ``requests`` and ``headers`` hold what reached it, in order; ``cancelled`` counts
    calls whose caller hung up before the answer was complete.
    """

    def __init__(self) -> None:
        super().__init__({"/v1/chat/completions": self._openai,
                          "/v1/messages": self._anthropic})
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.reply: str | None = None
        self.delay = 0.0
        self.chunk_delay = 0.0
        self.status: int | None = None
        self.cancelled = 0

    def __enter__(self) -> FakeProvider:
        self.start()
        return self

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> dict[str, Any]:
        """The body of the last request that reached it."""
        return self.requests[-1]

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Waits (from any thread or task) until ``count`` requests have reached it."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    async def arrived(self, count: int, timeout: float = 10.0) -> bool:
        """``wait_for_requests`` for async code (a hook): waits without blocking."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # --- answering ----------------------------------------------------------------------

    async def _received(self, request: web.Request, error: Callable[[str], Any]
                        ) -> tuple[dict[str, Any], str, web.StreamResponse | None]:
        """Records the request; returns its body, the answer's text, and an early answer
        (an error, or nothing for a caller that hung up)."""
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        waited = 0.0
        while waited < self.delay:
            await asyncio.sleep(0.01)
            waited += 0.01
            if request.transport is None or request.transport.is_closing():
                self.cancelled += 1
                return body, "", web.Response(status=499)
        if self.status is not None:
            message = f"fake provider answers {self.status}"
            return body, "", web.json_response(error(message), status=self.status)
        return body, self.reply if self.reply is not None else _echo(body), None

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body, text, early = await self._received(request, lambda message: {
            "error": {"message": message, "type": "fake_error", "code": None}})
        if early is not None:
            return early
        model = body.get("model", "")
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": model, "usage": usage, "choices": [{
                    "index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text}}]})
        chunks: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        chunks += [{"content": piece} for piece in _pieces(text)]
        events = [{"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                   "model": model, "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": None}]} for delta in chunks]
        events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                       "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                           "created": 1, "model": model, "choices": [], "usage": usage})
        lines = [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
        return await self._sse(request, lines)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body, text, early = await self._received(request, lambda message: {
            "type": "error", "error": {"type": "fake_error", "message": message}})
        if early is not None:
            return early
        model = body.get("model", "")
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 10, "output_tokens": 5}}
        if not body.get("stream"):
            return web.json_response({**message, "content": [{"type": "text", "text": text}]})
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                           "usage": {"input_tokens": 10,
                                                     "output_tokens": 1}}}),
            ("content_block_start", {"index": 0,
                                     "content_block": {"type": "text", "text": ""}})]
        events += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                  "text": piece}})
                   for piece in _pieces(text)]
        events += [("content_block_stop", {"index": 0}),
                   ("message_delta", {"delta": {"stop_reason": "end_turn",
                                                "stop_sequence": None},
                                      "usage": {"output_tokens": 5}}),
                   ("message_stop", {})]
        return await self._sse(request, [
            f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
            for name, data in events])

    async def _sse(self, request: web.Request, lines: list[str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for line in lines:
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
                if request.transport is None or request.transport.is_closing():
                    self.cancelled += 1
                    return response
            await response.write(line.encode())
        await response.write_eof()
        return response


def _echo(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return f"echo: {content}"
        return "echo: " + "".join(part.get("text", "") for part in content or []
                                  if isinstance(part, dict) and part.get("type") == "text")
    return "echo: "


def _pieces(text: str) -> list[str]:
    """``text`` in word-sized stream chunks."""
    words = text.split(" ")
    return [word + (" " if i < len(words) - 1 else "") for i, word in enumerate(words)]


class Proxy:
    """hookproxy on a loopback port, in this process, in front of a ``FakeProvider``.

    ``plugins`` maps names to plugin objects (modules, classes' instances) to register
    besides the installed ones; each is enabled. ``settings`` maps plugin names (yours or
    installed ones) to their ``[plugins.NAME]`` tables. ``config`` adds or replaces
    top-level config sections (``server``, ``routing``, ``classifiers``...).
    ``provider`` is the fake provider to use; one is started (and stopped) if not given.

    Under it, a hook marked ``reports_changes`` is checked to report every change it
    makes: one that does not fails its request with a 500 that names it. (The check
    encodes the request around each hook, which a served proxy does not.)
    """

    def __init__(self, *, plugins: Mapping[str, object] | None = None,
                 settings: Mapping[str, dict[str, Any]] | None = None,
                 config: Mapping[str, Any] | None = None,
                 provider: FakeProvider | None = None) -> None:
        self._own_provider = provider is None
        self.provider = provider or FakeProvider()
        self.plugins = dict(plugins or {})
        self.settings = dict(settings or {})
        self.extra_config = dict(config or {})
        # Every finished request's context, once what observes it has run.
        self.records: list[RequestContext] = []
        self.gateway: Gateway | None = None
        self._server: GatewayServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    def config(self, settings: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The config the proxy runs on (as a dict, before parsing)."""
        tables: dict[str, dict[str, Any]] = {name: {} for name in self.plugins}
        tables.update(self.settings if settings is None else settings)
        config: dict[str, Any] = {
            "providers": {
                "fake-openai": {"type": "openai", "base_url": self.provider.openai_url,
                                "timeout": 30},
                "fake-anthropic": {"type": "anthropic",
                                   "base_url": self.provider.anthropic_url, "timeout": 30},
            },
            "models": [{"name": OPENAI_MODEL, "provider": "fake-openai"},
                       {"name": ANTHROPIC_MODEL, "provider": "fake-anthropic"}],
            "log": {"path": ""},
            "routing": {"retries": 0},
            "plugins": tables,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> Proxy:
        if self._own_provider:
            self.provider.start()
        try:
            self._start()
        except BaseException:
            if self._own_provider:
                self.provider.stop()
            raise
        return self

    def _start(self) -> None:
        dispatch.CHECK_REPORTS = True
        host = PluginHost()
        host.discover()
        for name, plugin in self.plugins.items():
            host.add(plugin, name)
        config = parse_config(self.config(), "proxy.testing")
        self.gateway = Gateway(config, host=host, on_finish=self.records.append)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = GatewayServer(uvicorn_config(create_app(self.gateway), config.server),
                                     self.gateway)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="hookproxy-under-test")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError(f"hookproxy did not start: "
                                   f"{self.gateway.startup_error or 'see the log above'}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stops the proxy the way SIGTERM does: requests finish, plugins shut down."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._own_provider:
            self.provider.stop()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> PluginApp:
        """The ``PluginApp`` plugins see: ``app.store``, ``app.session``..."""
        assert self.gateway is not None, "the proxy is not running"
        return self.gateway.app

    def openai(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this proxy (no retries)."""
        import openai

        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", **kwargs)

    def anthropic(self, **kwargs: Any) -> Any:
        """An ``anthropic.Anthropic`` client for this proxy (no retries)."""
        import anthropic

        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=self.url, **kwargs)

    def settled(self, timeout: float = 10.0) -> list[RequestContext]:
        """``records`` once what observes the requests answered so far (on_error,
        request_end) has run: that happens just after each answer has gone out."""
        from proxy import pipeline

        # A client can read a stream's last bytes before the server's side of the request
        # is over (its record not even queued yet): that is waited for too.
        in_flight = self._server.server_state.tasks if self._server is not None else set()
        deadline = time.monotonic() + timeout
        while (in_flight or pipeline.observing()) and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.records

    def reload(self, settings: Mapping[str, dict[str, Any]]) -> list[str]:
        """Reloads the running proxy with new plugin ``settings`` (as SIGHUP re-reads a
        config file); returns what plugins' startup / config_reloaded hooks reported."""
        assert self.gateway is not None and self.gateway.observer.loop is not None
        gateway, loop = self.gateway, self.gateway.observer.loop
        config = parse_config(self.config(settings), "proxy.testing")

        async def reload() -> list[str]:
            gateway.reload(config)
            return await gateway.plugins_reloaded if gateway.plugins_reloaded else []

        self.settings = dict(settings)
        return asyncio.run_coroutine_threadsafe(reload(), loop).result(30)
