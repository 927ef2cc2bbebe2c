"""The one ASGI layer hookproxy puts in front of starlette's application: the Host check
(``proxy.hosts``), the body's deadline (``proxy.connections.body_deadline``), and a
direct call of the API endpoints whose path has no parameters.

Starlette reaches an endpoint through its error and exception middleware, the router
(which tries each route's pattern in turn) and the route's own wrapper; for the API
endpoints, which answer every error themselves (``Gateway.serve``), that is work per
request with no effect. (Were one to fail past that, uvicorn answers the plain-text 500
starlette's error middleware would have, and closes the connection.) What starlette
decides otherwise (the lifespan, the other routes, a method a path does not take, a path
nothing serves) it still decides."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.connections import BODY_RECEIVED, body_deadline, fast_send
from proxy.endpoints import not_sent
from proxy.hosts import HostCheck

Endpoint = Callable[[Request], Any]


def direct_endpoints(routes: Sequence[BaseRoute], own_errors: Collection[Endpoint]
                     ) -> dict[tuple[str, str], Endpoint]:
    """(method, path) -> endpoint, for the routes to one of ``own_errors`` (endpoints that
    answer every error themselves, so that starlette's exception handlers have nothing to
    do) whose path has no parameters, where starlette would pick them for that path and
    method: no route before them could match it."""
    found: dict[tuple[str, str], Endpoint] = {}
    for index, route in enumerate(routes):
        if not isinstance(route, Route):
            break  # a mount or host: what follows could be behind it
        endpoint = route.endpoint
        if endpoint not in own_errors or route.param_convertors or not route.methods or \
                not inspect.iscoroutinefunction(endpoint):
            continue
        if any(earlier.path_regex.match(route.path) for earlier in routes[:index]
               if isinstance(earlier, Route) and earlier.param_convertors):
            continue
        for method in route.methods:
            found.setdefault((method, route.path), endpoint)
    return found


class Front:
    """The ASGI application in front of starlette's (``app``): refuses a Host that is not
    allowed (see ``HostCheck``), puts a deadline on the body, and calls the API endpoints
    (``own_errors``) itself."""

    def __init__(self, app: ASGIApp, gateway: Any, routes: Sequence[BaseRoute],
                 own_errors: Collection[Endpoint], body_timeout: float) -> None:
        self.app = app
        self.hosts = HostCheck(gateway)
        self.body_timeout = body_timeout
        self.direct = direct_endpoints(routes, own_errors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                break
        # Browsers always send Host; a request without one cannot come from a page.
        if host is not None and not self.hosts.allowed(host):
            await self.hosts.refuse(scope, send, host)
            return
        if BODY_RECEIVED not in scope:  # most bodies are in by now: no deadline to keep
            receive = body_deadline(scope, receive, self.body_timeout)
        # (Under a root path, starlette's routing tells what the path is.)
        endpoint = None if scope.get("root_path") else \
            self.direct.get((scope["method"], scope["path"]))
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        send = fast_send(send)
        response = await endpoint(Request(scope, receive, send))
        try:
            await response(scope, receive, send)
        except BaseException:
            not_sent(response)
            raise
