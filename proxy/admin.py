"""Who may see /dashboard, /dashboard/events and /metrics and use /admin: anyone while no
client keys are configured; with keys, only the holder of the admin key, sent as a
header or entered once on the login page, which sets a session cookie."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from proxy.config import AuthConfig
from proxy.errors import ProxyError
from proxy.formats.openai import encode_error

COOKIE = "hookproxy_admin"
Endpoint = Callable[[Request], Awaitable[Response]]

LOGIN = """<!doctype html><meta charset="utf-8"><title>hookproxy — sign in</title>
<body style="font:14px system-ui;margin:4em auto;max-width:24em">
<h1>hookproxy</h1><p>{message}</p>
<form method="get" action="/dashboard"><input type="password" name="key"
placeholder="admin key" autofocus style="width:100%;padding:6px">
<button style="margin-top:8px">Sign in</button></form></body>"""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AdminGuard:
    def __init__(self, auth: AuthConfig) -> None:
        # A per-process session token: the cookie never holds the key itself.
        self.session = os.urandom(32).hex()
        self.configure(auth)

    def configure(self, auth: AuthConfig) -> None:
        self.required = bool(auth.keys)
        secret = os.environ.get(auth.admin_key_env, "") if auth.admin_key_env else ""
        self.digest = _digest(secret) if secret else (auth.admin_key_sha256 or None)

    def _is_admin(self, request: Request) -> bool:
        if not self.required:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie, self.session):
            return True
        authorization = request.headers.get("authorization", "")
        secret = (authorization[7:].strip() if authorization[:7].lower() == "bearer "
                  else request.headers.get("x-api-key", ""))
        return self._is_key(secret)

    def _is_key(self, secret: str) -> bool:
        return bool(self.digest and secret
                    and hmac.compare_digest(_digest(secret), self.digest))

    def protect(self, endpoint: Endpoint, page: bool = False) -> Endpoint:
        async def guarded(request: Request) -> Response:
            if self._is_admin(request):
                return await endpoint(request)
            if page:
                key = request.query_params.get("key", "")
                if self._is_key(key):
                    response = RedirectResponse("/dashboard", status_code=303)
                    response.set_cookie(COOKIE, self.session, httponly=True,
                                        samesite="strict")
                    return response
                message = ("That is not the admin key." if key else
                           "This proxy has client keys: the dashboard needs the admin key."
                           if self.digest else "Set [auth].admin_key_env to use the dashboard.")
                return HTMLResponse(LOGIN.format(message=escape(message)), status_code=401)
            error = ProxyError(401, "This endpoint needs the admin key "
                                    "([auth].admin_key_env)", code="admin_key_required")
            return Response(encode_error(error), status_code=401,
                            media_type="application/json")

        return guarded
