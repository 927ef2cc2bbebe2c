"""Client connections at the HTTP level, below starlette: a cap on the size of a request's
headers, a deadline for receiving them and one for receiving the body, so that a client
cannot hold memory or a connection open by sending a request slowly or without end."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

import httptools
import structlog
import uvicorn
from starlette.requests import Request as HttpRequest
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from proxy.config import ServerConfig
from proxy.endpoints import refusal_wire, shown_path
from proxy.errors import ProxyError
from proxy.headers import CheckedHeaders
from proxy.ids import new_request_id

log = structlog.get_logger("hookproxy.server")
# Where an API request is recorded when it is refused before starlette sees it.
API_PATHS = ("/v1/", "/chat/")
# Where the scope of a request whose body could not be parsed holds the error.
BROKEN_BODY = "hookproxy.broken_body"
# Where the scope of a request holds its ClientGone (set by the guarded protocol).
CLIENT_GONE = "hookproxy.client_gone"
# Set in the scope of a request once its whole body has been received.
BODY_RECEIVED = "hookproxy.body_received"
# Gateway.rejected: (request_id, endpoint, client_format, error, started_wall, started).
Refused = Callable[[str, str, str, ProxyError, float, float], None]


class _HeadersTooLarge(Exception):
    pass


class ClientGone:
    """Says when the client of a request has gone, without a task waiting on the ASGI
    ``receive`` for its ``http.disconnect``: the protocol calls ``left`` when the
    connection is lost before the request's answer is complete."""

    __slots__ = ("_flow", "callback", "gone")

    def __init__(self, flow: FlowControl) -> None:
        self._flow = flow  # the connection's
        self.callback: Callable[[], None] | None = None
        self.gone = False

    def watch(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` (once) if the client leaves, until ``unwatch``."""
        # As a receive() waiting for the disconnect would: reading on, so that a client
        # that leaves is seen even if reading was paused.
        if self._flow.read_paused:
            self._flow.resume_reading()
        self.callback = callback

    def unwatch(self) -> None:
        self.callback = None

    def left(self) -> None:
        self.gone = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class BodyTimeout(ProxyError):
    """The request's body did not arrive in time: a 408, and the connection closes (what
    is still on its way would otherwise be read as the next request)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"The request body did not arrive within {timeout:g} seconds",
                         code="request_timeout", headers={"connection": "close"})


def body_deadline(scope: Scope, receive: Receive, timeout: float) -> Receive:
    """``receive`` for a request whose body must have arrived ``timeout`` seconds after its
    headers: reading it later raises ``BodyTimeout``, which an API endpoint answers in the
    client's own format (with a record) and any other route as plain text. What the app
    receives after the body (the wait for a disconnect) has no deadline, and a request
    whose body is in already (most are, by the time the app starts) needs none."""
    if BODY_RECEIVED in scope:
        return receive
    deadline = asyncio.get_running_loop().time() + timeout
    complete = False

    async def receive_in_time() -> Message:
        nonlocal complete
        if complete or BODY_RECEIVED in scope:
            # Nothing left to wait for (the protocol has the whole body): no deadline.
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(timeout) from None
        complete = message["type"] != "http.request" or not message.get("more_body")
        return message

    return receive_in_time


async def body_late(http: HttpRequest, exc: Exception) -> PlainTextResponse:
    """The answer of a route that is not an API endpoint (the login form) to a body that
    came too late."""
    assert isinstance(exc, ProxyError)
    return PlainTextResponse(exc.message, status_code=exc.status, headers=exc.headers)


def fast_send(send: Send) -> Send:
    """``send``, or, when it is a uvicorn request cycle's own, one for this request that
    starts an answer with ``CheckedHeaders`` faster (``_send``). Made per request and held
    only by the request's frames: a send kept on the cycle would hold the cycle in a
    reference cycle, which only the (rarely run) cycle collector frees."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is RequestResponseCycle:
        return functools.partial(_send, cycle)
    return send


def _send(cycle: RequestResponseCycle, message: Any) -> Coroutine[Any, Any, None]:
    """A request cycle's ``send`` as ``fast_send`` gives it: uvicorn's, except that the
    start of an answer whose headers are ``CheckedHeaders`` is written without uvicorn's
    two pattern searches per header (and its lowering of each name), which hookproxy made
    needless when it made them. Not a coroutine function: the answer's other messages are
    uvicorn's coroutine alone, with no layer of this one around them."""
    if message["type"] == "http.response.start" and not cycle.response_started:
        headers = message.get("headers")
        if type(headers) is CheckedHeaders and not (
                cycle.disconnected or cycle.flow.write_paused or cycle.access_log):
            _write_start(cycle, message["status"], headers)
            return _sent()
    return RequestResponseCycle.send(cycle, message)


def _write_start(cycle: RequestResponseCycle, status_code: int,
                 headers: CheckedHeaders) -> None:
    # What uvicorn's send does for "http.response.start" (0.54, checked by the digest in
    # tests/test_hostile_client.py), less what CheckedHeaders vouch for.
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    content = [STATUS_LINE[status_code]]
    has_connection_close = False
    for name, value in (*cycle.default_headers, *headers):
        if name == b"content-length" and cycle.chunked_encoding is None:
            cycle.expected_content_length = int(value.decode())
            cycle.chunked_encoding = False
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            cycle.expected_content_length = 0
            cycle.chunked_encoding = True
        elif name == b"connection":
            connection = [token.lower().strip() for token in value.split(b",")]
            if b"close" in connection:
                cycle.keep_alive = False
                has_connection_close = True
        content.extend([name, b": ", value, b"\r\n"])
    if not cycle.keep_alive and not has_connection_close:
        content.append(b"connection: close\r\n")
    if cycle.chunked_encoding is None and cycle.scope["method"] != "HEAD" and \
            status_code not in (204, 304):
        cycle.chunked_encoding = True
        content.append(b"transfer-encoding: chunked\r\n")
    content.append(b"\r\n")
    cycle.transport.write(b"".join(content))


async def _sent() -> None:
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: the request line and headers of each request
    are at most ``max_header_bytes`` (else 431 and the connection closes), and must be
    complete within ``header_timeout`` seconds of the connection opening or of the
    request's first byte (else the connection closes). A body still arriving
    ``body_timeout`` seconds after its headers closes the connection once it has been
    answered (``body_deadline`` makes the app answer a 408 then; a route that answered
    without reading the body cannot keep the connection by a trickle). Idle connections
    between requests are closed after uvicorn's keep-alive timeout, by a timer armed
    lazily as the others (uvicorn arms and cancels one per request); only a request
    beginning ends that wait. A lost connection cancels the request whose app runs
    (uvicorn tells only the newest, which may be one pipelined behind it) and records
    499s for those pipelined behind it. (``Front`` sends the API's answers through
    ``fast_send``: one with ``CheckedHeaders`` starts without uvicorn's checks.)"""

    max_header_bytes = 64 * 1024
    header_timeout = 10.0
    body_timeout = 60.0
    refused: Refused | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._too_large = False
        # Between a request's first byte and the end of its headers.
        self._in_headers = False
        # When the headers being waited for must be complete (None: none are awaited).
        # A timer is not armed and cancelled per request: most requests' headers come
        # whole in the read that begins them. One is armed when a read ends with headers
        # unfinished (and when the connection opens), and when it fires it closes the
        # connection only if the deadline it was armed for still stands.
        self._header_deadline: float | None = None
        # The request's headers: their bytes, and how many of the list are counted.
        self._header_size = self._headers_counted = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_timer_at = 0.0
        # Bytes read while in headers: httptools holds a header value until it ends.
        self._unfinished = 0
        # Armed, likewise, only when a read ends with the body unfinished.
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_late = False
        # Between a request's headers and the end of its body.
        self._in_body = False
        # Set when the parser failed: what follows is read but not parsed, and this answer
        # goes out once the requests before are answered.
        self._stopped = False
        # (Called with True if the client leaves first: then only its record is written.)
        self._refusal: Callable[[bool], None] | None = None
        # Since when the connection is idle between requests (None: a request is in);
        # ``timeout_keep_alive_task`` fires at the earliest when it would be too long.
        # Only a request beginning ends the wait: bytes that begin none (a bare CRLF,
        # which the parser skips) do not.
        self._idle_since: float | None = None
        # The cycle whose app runs (or last ran); pipelined ones wait in self.pipeline.
        self._running: RequestResponseCycle | None = None
        self._forget_request()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.time() + self.header_timeout
        self._arm_header_timer(self._header_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._cancel_body_timer()
        self._idle_since = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        running, queued = self._running, [cycle for cycle, _ in self.pipeline]
        self.pipeline.clear()
        # uvicorn's marks only the newest cycle disconnected: with requests pipelined, one
        # that waits, not the one whose app runs.
        super().connection_lost(exc)
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()  # a receive() waiting for the disconnect returns
            gone: ClientGone | None = running.scope.get(CLIENT_GONE)  # type: ignore[assignment]
            if gone is not None:
                gone.left()
        for cycle in queued:
            cycle.disconnected = True
        if queued or self._refusal is not None:
            # After the running request's record, as a rule: its task, cancelled above,
            # takes its next step before this.
            self.loop.call_soon(self._record_unanswered, queued)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _record_unanswered(self, queued: list[RequestResponseCycle]) -> None:
        """The records of the requests the client left before they were answered, behind
        the one that ran: 499s, for those pipelined (received whole or in part, never
        run) and for one refused (``_refuse``) whose refusal waited its turn."""
        for cycle in queued:
            scope = cycle.scope
            path, method = shown_path(scope["path"]), scope["method"]
            if self.refused is None or method != "POST" or not path.startswith(API_PATHS):
                continue
            request_id = new_request_id()
            error = ProxyError(499, "The client left before the request was run",
                               code="client_disconnected")
            log.info("client_disconnected", request_id=request_id, endpoint=path[:100],
                     status=499, error=error.message)
            self.refused(request_id, path, refusal_wire(path, scope["headers"]).NAME, error,
                         time.time(), time.perf_counter())
        if self._refusal is not None:
            self._refusal(True)

    def _arm_header_timer(self, deadline: float) -> None:
        self._header_timer_at = deadline
        self._header_timer = self.loop.call_at(deadline, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return  # the headers it was armed for came in time, and none are awaited
        if deadline > self._header_timer_at:
            # Armed for an earlier request's headers: these have until their own deadline.
            self._arm_header_timer(deadline)
        elif not self.transport.is_closing():
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_overdue(self) -> None:
        self._body_timer = None
        self._body_late = True
        if self.cycle is not None and self.cycle.response_complete:
            self.transport.close()

    def _keepalive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle = self._idle_since
        if idle is None:
            return  # a request came; its answer arms the timer again
        due = idle + self.timeout_keep_alive
        if due > self.loop.time():
            # Armed for an earlier wait: this one has until its own end.
            self.timeout_keep_alive_task = self.loop.call_at(due, self._keepalive_due)
        elif not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        if self._body_late:
            self.transport.close()
        # As uvicorn's (0.54), but the keep-alive wait is timed by ``_keepalive_due``.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif not (self._in_headers or self._in_body):
            # Idle, unless the next request has begun (its headers or body still coming:
            # their own deadlines bound it).
            self._idle_since = self.loop.time()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_at(
                    self._idle_since + self.timeout_keep_alive, self._keepalive_due)
        if self._refusal and self.cycle.response_complete and not self.transport.is_closing():
            self._refusal(False)  # the requests before the one refused have been answered

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # uvicorn's ends the keep-alive wait as any data comes (cancelling its timer);
        # here a request beginning ends it, and the timer, left armed, does nothing then.
        self._idle_since = None
        self._unfinished = 0
        self._in_headers = True
        self._body_late = False

    def on_headers_complete(self) -> None:
        # The request line and headers, counted as they came (each header's name, value,
        # ": " and CRLF); what a read delivers past the cap is parsed before this check,
        # so a request holds at most the cap plus one read (data_received bounds headers
        # that span reads).
        headers = self.headers
        size = len(self.url) + 4 * len(headers)
        for name, value in headers:
            size += len(name) + len(value)
        if size > self.max_header_bytes:
            self._too_large = True
            raise _HeadersTooLarge
        # A chunked body's trailers are added to the same list later: counted per read
        # against the same cap, from here (data_received).
        self._header_size, self._headers_counted = size, len(headers)
        self._header_deadline = None
        self._in_headers = False
        self.scope[CLIENT_GONE] = ClientGone(self.flow)  # type: ignore[literal-required]
        super().on_headers_complete()
        self._in_body = True

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_body = False
        self.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]
        super().on_message_complete()
        self.url = b""  # as _forget_request
        self.headers = []

    def _forget_request(self) -> None:
        # What a refusal reads of the request being parsed (uvicorn sets them when one
        # begins): nothing of the one before it.
        self.url = b""
        self.headers = []

    def data_received(self, data: bytes) -> None:
        # As uvicorn's, but headers past the cap get a 431, and what cannot be parsed a
        # 400 saying why, both in the client's format (with a record, for the API).
        if self._stopped:
            return  # the parser failed: what follows is dropped unparsed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._too_large:
                self._send_431()
                return
            self._refuse(400, f"Invalid HTTP request: {exc}", "invalid_http_request")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers:
            # All of this read went into headers that are still unfinished.
            self._unfinished += len(data)
            if self._unfinished > self.max_header_bytes:
                self._send_431()
            elif self._header_deadline is None:
                # This read began the request: its headers are due header_timeout from now.
                self._header_deadline = self.loop.time() + self.header_timeout
                if self._header_timer is None:
                    self._arm_header_timer(self._header_deadline)
                # else it fires earlier, and arms again for this deadline
        elif self._in_body:
            if len(self.headers) > self._headers_counted and self._trailers_too_large():
                self._send_431()
            elif self._body_timer is None:
                # The body is due body_timeout after the headers, which this read completed.
                self._body_timer = self.loop.call_later(self.body_timeout,
                                                        self._body_overdue)

    def _trailers_too_large(self) -> bool:
        """Counts the trailers a chunked body added since the last read (each counted
        once) with the headers; whether they are past the cap together."""
        headers = self.headers
        size = self._header_size
        for index in range(self._headers_counted, len(headers)):
            name, value = headers[index]
            size += len(name) + len(value) + 4
        self._header_size, self._headers_counted = size, len(headers)
        return size > self.max_header_bytes

    def _send_431(self) -> None:
        self._refuse(431, f"Request headers are larger than {self.max_header_bytes} bytes",
                     "headers_too_large")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answers ``status`` and closes the connection, once the requests before this one
        on it are answered: in the client's format when the request line was read
        (Anthropic's or OpenAI's, as a 404 would be), with a record for an API POST, and a
        log line. A broken body is the app's to answer (``BROKEN_BODY``)."""
        # What comes after is read and dropped (``data_received``), not left unread: a
        # client that leaves while the requests before this one are answered is seen.
        self._stopped = True
        error = ProxyError(status, message, code=code)
        if self._in_body:
            self._refuse_body(error)
            return
        request_id = new_request_id()
        path = shown_path(self.url.split(b"?", 1)[0].decode("latin-1")) if self.url else ""
        method = self.parser.get_method().decode("latin-1") if path else ""
        # (All the headers are read by now when they were too large as a whole.)
        wire = refusal_wire(path, self.headers)
        log.warning("bad_http_request", request_id=request_id, endpoint=path[:100],
                    status=status, error=message)
        body = wire.encode_error(error)
        answer = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\nx-request-id: %s\r\nconnection: close\r\n\r\n%s"
                  % (status, HTTPStatus(status).phrase.encode(), len(body), request_id.encode(),
                     body))
        started, started_wall = time.perf_counter(), time.time()

        def send(left: bool) -> None:
            self._refusal = None
            recorded = error
            if left:  # before the requests ahead of this one were answered
                recorded = ProxyError(499, f"The client left before it was answered: "
                                           f"{message}", code="client_disconnected")
            else:
                self.transport.write(answer)
                self.transport.close()
            if self.refused is not None and method == "POST" and path.startswith(API_PATHS):
                self.refused(request_id, path, wire.NAME, recorded, started_wall, started)

        self._refusal = send
        if self.cycle is None or self.cycle.response_complete:
            send(False)

    def _refuse_body(self, error: ProxyError) -> None:
        # The body of the request in flight cannot be parsed (a broken chunk): the app,
        # still reading it, gets what came so far with the error beside it, and answers;
        # the connection closes after that answer.
        cycle = self.cycle
        cycle.keep_alive = False
        if cycle.response_complete:
            self.transport.close()
        elif not cycle.response_started:
            cycle.scope[BROKEN_BODY] = error  # type: ignore[literal-required]
            cycle.more_body = False
            cycle.message_event.set()


def uvicorn_config(app: Any, server: ServerConfig, refused: Refused | None = None,
                   **options: Any) -> uvicorn.Config:
    """uvicorn's config for the proxy: the guarded protocol with the [server] limits;
    ``refused`` records an API request refused before it reached the app
    (``Gateway.rejected``)."""
    protocol = type("HttpProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": server.max_header_bytes,
        "header_timeout": server.header_timeout,
        "body_timeout": server.body_timeout,
        "refused": staticmethod(refused) if refused else None,
    })
    options.setdefault("log_level", "warning")
    return uvicorn.Config(app, http=protocol, access_log=False, lifespan="on",
                          timeout_keep_alive=max(1, round(server.keepalive_timeout)),
                          h11_max_incomplete_event_size=server.max_header_bytes, **options)
