"""Running the proxy as a real uvicorn server on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.config import parse_config
from proxy.connections import uvicorn_config
from proxy.context import RequestContext
from proxy.plugins import PluginHost
from proxy.server import Gateway, GatewayServer, create_app

T = TypeVar("T")


class ProxyServer:
    def __init__(self, config: dict[str, Any], host: PluginHost | None = None,
                 on_finish: Callable[[RequestContext], None] | None = None) -> None:
        self.config = parse_config(config, "test-config.toml")
        self.gateway = Gateway(self.config, host=host, on_finish=on_finish)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        server_config = uvicorn_config(create_app(self.gateway), self.config.server,
                                       refused=self.gateway.rejected)
        self.server = GatewayServer(server_config, self.gateway)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ProxyServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("proxy did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def settled(self, value: T) -> T:
        """``value``, once what observes the requests answered so far (on_error,
        request_end, on_finish, the record) has run: that happens just after each answer
        has gone out."""
        from proxy import pipeline

        # A client can read a stream's last bytes before the server's side of the request
        # is over (its record not even queued yet): wait for that too.
        in_flight = self.server.server_state.tasks
        wait_for(lambda: not in_flight and not pipeline.observing())
        return value

    def openai(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("api_key", "test-key")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, **kwargs)

    def anthropic(self, **kwargs: Any) -> Any:
        import anthropic

        kwargs.setdefault("api_key", "test-key")
        return anthropic.Anthropic(base_url=self.url, max_retries=0, **kwargs)


def upstream_config(upstream: Any, **extra: Any) -> dict[str, Any]:
    """A config with an OpenAI and an Anthropic provider on the fake upstream, a mock,
    and models named after the behaviour they trigger there."""
    config: dict[str, Any] = {
        "providers": {
            "oai": {"type": "openai", "base_url": upstream.openai_url, "timeout": 1.5},
            "ant": {"type": "anthropic", "base_url": upstream.anthropic_url, "timeout": 1.5},
            "mock": {"type": "mock"},
        },
        "models": [
            {"name": "gpt-test", "provider": "oai"},
            {"name": "claude-test", "provider": "ant"},
            {"name": "mock-1", "provider": "mock"},
        ],
        "log": {"path": ""},
        # Errors surface at once here; tests/test_routing.py covers retries and cooldown.
        "routing": {"retries": 0, "cooldown_failures": 1000},
    }
    for key, value in extra.items():
        config[key] = value
    return config


def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], Any]:
    """POSTs bytes as they are; returns (status, headers, decoded JSON body)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


class ServedApp:
    """A small aiohttp app on a loopback port in its own thread: a provider that misbehaves
    in one particular way. ``routes`` maps POST paths to handlers."""

    def __init__(self, routes: dict[str, Any], client_max_size: int = 1024 ** 2) -> None:
        import asyncio

        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.app = web.Application(client_max_size=client_max_size)
        for path, handler in routes.items():
            self.app.router.add_post(path, handler)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServedApp:
        import asyncio

        from aiohttp import web

        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(10)
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(10)
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: object) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls ``predicate`` until it is truthy: what observes a request (on_error,
    request_end, the record) runs just after its answer has gone out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)
