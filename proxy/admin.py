"""Who may see /dashboard, /dashboard/events and /metrics and use /admin: anyone while no
client keys are configured; with keys, only the holder of the admin key, sent as a
header (``Authorization: Bearer``) or entered on the login page.

A login starts a session of its own: a random token in an HttpOnly, SameSite=Strict
cookie (Secure when the request came over https), valid for ``[auth].admin_session_ttl``
seconds and forgotten when the admin key changes. The key never travels in a URL. Failed
attempts are throttled per client address and overall. A POST to /admin needs, besides
the session, its CSRF token (the ``x-csrf-token`` header; the dashboard page carries it in
a meta tag), or else the key itself as a bearer header; a POST from another origin is
refused even when no keys are configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from proxy.config import AuthConfig
from proxy.errors import ProxyError
from proxy.formats.openai import encode_error

COOKIE = "hookproxy_admin"
Endpoint = Callable[[Request], Awaitable[Response]]

# Failed key attempts: this many per client address within the window, and this many
# from everyone together, after which attempts get a 429 until the window has passed.
FAILURES_PER_CLIENT = 5
FAILURES_OVERALL = 50
FAILURE_WINDOW = 60.0
# Bounds on what the guard holds, whatever clients do.
_MAX_CLIENTS = 10_000
_MAX_SESSIONS = 1_000

_LOGIN_STYLE = ("body{font:14px system-ui;margin:4em auto;max-width:24em}"
                "input{width:100%;padding:6px}button{margin-top:8px}")
_STYLE_HASH = base64.b64encode(hashlib.sha256(_LOGIN_STYLE.encode()).digest()).decode()
LOGIN = """<!doctype html><meta charset="utf-8"><title>hookproxy — sign in</title>
<style>{style}</style>
<h1>hookproxy</h1><p>{message}</p>
<form method="post" action="/dashboard/login"><input type="password" name="key"
placeholder="admin key" autocomplete="current-password" autofocus>
<button>Sign in</button></form>"""

# Sent with every dashboard response: no framing, no referrer, nothing but own files.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' "
        f"'sha256-{_STYLE_HASH}'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Session:
    __slots__ = ("csrf", "expires")

    def __init__(self, ttl: float) -> None:
        self.expires = time.monotonic() + ttl
        self.csrf = os.urandom(24).hex()


class AdminGuard:
    def __init__(self, auth: AuthConfig) -> None:
        # token -> session; oldest first, so that the bound drops the oldest.
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.digest: str | None = None
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._all_failures: deque[float] = deque()
        self.configure(auth)

    def configure(self, auth: AuthConfig) -> None:
        self.required = bool(auth.keys)
        self.ttl = auth.admin_session_ttl
        secret = os.environ.get(auth.admin_key_env, "") if auth.admin_key_env else ""
        digest = _digest(secret) if secret else (auth.admin_key_sha256 or None)
        if digest != self.digest:
            # A new key ends every session opened with the old one.
            self.sessions.clear()
        self.digest = digest

    # --- who is asking --------------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        found = self.sessions.get(token) if token else None
        if found is None:
            return None
        if found.expires < time.monotonic():
            del self.sessions[token]
            return None
        return found

    def _bearer(self, request: Request) -> str:
        authorization = request.headers.get("authorization", "")
        return (authorization[7:].strip() if authorization[:7].lower() == "bearer "
                else request.headers.get("x-api-key", ""))

    def is_admin(self, request: Request) -> bool:
        """The admin session or the admin key (or no keys configured at all)."""
        if not self.required or self.session(request) is not None:
            return True
        secret = self._bearer(request)
        return bool(secret) and self._check_key(request, secret) is True

    def _is_key(self, secret: str) -> bool:
        return bool(self.digest and secret
                    and hmac.compare_digest(_digest(secret), self.digest))

    # --- throttling failed attempts -------------------------------------------------------

    def _throttled(self, client: str) -> float:
        """Seconds until ``client`` may try a key again (0: now)."""
        now = time.monotonic()
        while self._all_failures and self._all_failures[0] < now - FAILURE_WINDOW:
            self._all_failures.popleft()
        mine = self._failures.get(client)
        while mine and mine[0] < now - FAILURE_WINDOW:
            mine.popleft()
        waits = [0.0]
        if mine is not None and len(mine) >= FAILURES_PER_CLIENT:
            waits.append(mine[0] + FAILURE_WINDOW - now)
        if len(self._all_failures) >= FAILURES_OVERALL:
            waits.append(self._all_failures[0] + FAILURE_WINDOW - now)
        return max(waits)

    def _failed(self, client: str) -> None:
        now = time.monotonic()
        self._all_failures.append(now)
        mine = self._failures.pop(client, None) or deque(maxlen=FAILURES_PER_CLIENT)
        mine.append(now)
        self._failures[client] = mine
        while len(self._failures) > _MAX_CLIENTS:
            self._failures.popitem(last=False)

    def _check_key(self, request: Request, secret: str) -> bool | float:
        """True for the admin key; else the seconds to wait (0.0: a plain failure)."""
        client = request.client.host if request.client else "?"
        wait = self._throttled(client)
        if wait > 0:
            return wait
        if self._is_key(secret):
            self._failures.pop(client, None)
            return True
        self._failed(client)
        return 0.0

    # --- sessions -------------------------------------------------------------------------

    def _start_session(self, request: Request, response: Response) -> None:
        token = os.urandom(32).hex()
        self.sessions[token] = Session(self.ttl)
        while len(self.sessions) > _MAX_SESSIONS:
            self.sessions.popitem(last=False)
        response.set_cookie(COOKIE, token, max_age=int(self.ttl), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    async def login(self, request: Request) -> Response:
        """POST /dashboard/login: the form on the login page."""
        if not _same_origin(request):
            return _login_page("Sign in from this proxy's own page.", 403)
        body = b""
        async for chunk in request.stream():  # a login form is small: read no more
            body += chunk
            if len(body) > 4096:
                return _login_page("That form is too large.", 413)
        key = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0]
        if not self.required:
            return RedirectResponse("/dashboard", status_code=303)
        outcome = self._check_key(request, key)
        if outcome is True:
            signed_in = RedirectResponse("/dashboard", status_code=303)
            self._start_session(request, signed_in)
            return signed_in
        if outcome:
            throttled = _login_page("Too many wrong keys: wait a minute and try again.", 429)
            throttled.headers["retry-after"] = str(int(outcome) + 1)
            return throttled
        return _login_page("That is not the admin key.", 401)

    async def logout(self, request: Request) -> Response:
        """POST /dashboard/logout (with the CSRF token): ends this session."""
        session = self.session(request)
        if session is None or not _same_origin(request) or not hmac.compare_digest(
                request.headers.get("x-csrf-token", ""), session.csrf):
            return _json_error(403, "Logging out needs the session's CSRF token",
                               "csrf_token_required")
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- guarding endpoints ---------------------------------------------------------------

    def protect(self, endpoint: Endpoint, page: bool = False) -> Endpoint:
        async def guarded(request: Request) -> Response:
            response = await self._guarded(request, endpoint, page)
            if page:
                response.headers.update(SECURITY_HEADERS)
            return response

        return guarded

    async def _guarded(self, request: Request, endpoint: Endpoint, page: bool) -> Response:
        posting = request.method == "POST"
        if posting and not _same_origin(request):
            return _json_error(403, "Admin requests from another origin are refused",
                               "cross_origin")
        if not self.required:
            return await endpoint(request)
        session = self.session(request)
        if session is not None:
            if posting and not hmac.compare_digest(
                    request.headers.get("x-csrf-token", ""), session.csrf):
                return _json_error(403, "This request needs the session's CSRF token "
                                        "(x-csrf-token) or the admin key as a bearer header",
                                   "csrf_token_required")
            request.state.admin_session = session
            return await endpoint(request)
        secret = self._bearer(request)
        if secret:
            outcome = self._check_key(request, secret)
            if outcome is True:
                return await endpoint(request)
            if outcome:
                response = _json_error(429, "Too many wrong admin keys: wait and try again",
                                       "admin_key_throttled")
                response.headers["retry-after"] = str(int(outcome) + 1)
                return response
        if page:
            message = ("This proxy has client keys: the dashboard needs the admin key."
                       if self.digest else "Set [auth].admin_key_env to use the dashboard.")
            return _login_page(message, 401)
        return _json_error(401, "This endpoint needs the admin key ([auth].admin_key_env)",
                           "admin_key_required")


def _same_origin(request: Request) -> bool:
    """False when a browser says the request came from another site's page."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or a same-origin GET-initiated navigation
    return urllib.parse.urlsplit(origin).netloc.lower() == request.headers.get(
        "host", "").lower()


def _login_page(message: str, status: int) -> HTMLResponse:
    page = LOGIN.format(style=_LOGIN_STYLE, message=escape(message))
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def _json_error(status: int, message: str, code: str) -> Response:
    return Response(encode_error(ProxyError(status, message, code=code)), status_code=status,
                    media_type="application/json")
