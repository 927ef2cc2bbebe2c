"""A client that attacks on purpose: requests a web page can forge, a Host it controls,
header injection through model names and tags, plugins with nonsense statuses, uploads
cut short, absurd parameters, and header floods. Each case checks the status and body
the client got, the record, and that a request alongside it is still served."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from proxy import Reject, RequestContext, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, post_raw, upstream_config, wait_for

HI = [{"role": "user", "content": "hello"}]
OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]


@contextmanager
def _serving(upstream: Any, tmp_path: Path, *plugins: tuple[str, Any],
             **config: Any) -> Iterator[ProxyServer]:
    host = PluginHost()
    host.discover()
    for name, plugin in plugins:
        host.add(plugin, name, "plugin")
    settings = upstream_config(upstream, plugins={name: {} for name, _ in plugins}, **config)
    settings["log"] = {"path": str(tmp_path / "requests.jsonl")}
    with ProxyServer(settings, host=host) as proxy:
        yield proxy


def _still_served(proxy: ProxyServer) -> None:
    reply = proxy.openai().chat.completions.create(model="mock-1", messages=HI)
    assert "hello" in reply.choices[0].message.content


def _request(proxy: ProxyServer, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (http.client adds only Host and length)."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _error_shape(endpoint: str, body: bytes | dict[str, Any]) -> str:
    payload = json.loads(body) if isinstance(body, bytes) else body
    if endpoint == ANTHROPIC:
        assert payload["type"] == "error" and payload["error"]["type"]
        return str(payload["error"]["message"])
    assert set(payload["error"]) >= {"message", "type", "code"}
    return str(payload["error"]["message"])


# --- requests a web page can forge ------------------------------------------------------


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x",
                                          "application/jsonp"])
def test_an_api_post_must_say_it_is_json(upstream, tmp_path, endpoint, content_type):
    body = json.dumps({"model": "mock-1", "max_tokens": 5, "messages": HI}).encode()
    headers = {"content-type": content_type} if content_type else {}
    with _serving(upstream, tmp_path) as proxy:
        status, _, answer = _request(proxy, "POST", endpoint, body, headers)
        assert status == 415
        assert "application/json" in _error_shape(endpoint, answer)
        # With the right type the same body is served.
        assert _request(proxy, "POST", endpoint, body,
                        {"content-type": "application/json; charset=utf-8"})[0] == 200
        _still_served(proxy)
    assert [r["status"] for r in _records(tmp_path)] == [415, 200, 200]


@pytest.mark.parametrize(("path", "method"), [(OPENAI, "POST"), (ANTHROPIC, "POST"),
                                              ("/dashboard/events", "GET"), ("/health", "GET"),
                                              ("/v1/models", "GET")])
def test_a_foreign_host_is_refused(upstream, tmp_path, path, method):
    body = json.dumps({"model": "mock-1", "max_tokens": 5, "messages": HI}).encode()
    headers = {"host": "attacker.example", "content-type": "application/json"}
    with _serving(upstream, tmp_path) as proxy:
        status, _, answer = _request(proxy, method, path, body if method == "POST" else None,
                                     headers)
        assert status == 421
        assert "attacker.example" in _error_shape(path, answer)
        assert "allowed_hosts" in _error_shape(path, answer)
        for name in ("localhost", f"localhost:{proxy.port}", "127.0.0.1", "[::1]:80"):
            assert _request(proxy, "GET", "/health", None, {"host": name})[0] == 200
        _still_served(proxy)
    records = _records(tmp_path)
    if method == "POST":
        assert records[0]["status"] == 421 and records[0]["error"]["type"] == "host_not_allowed"
    else:
        assert [r["status"] for r in records] == [200]


def test_allowed_hosts_names_the_hosts_served(upstream, tmp_path):
    with _serving(upstream, tmp_path, server={"allowed_hosts": ["proxy.internal",
                                                                "*.corp.example"]}) as proxy:
        assert _request(proxy, "GET", "/health", None, {"host": "proxy.internal:8080"})[0] == 200
        assert _request(proxy, "GET", "/health", None, {"host": "a.corp.example"})[0] == 200
        assert _request(proxy, "GET", "/health", None, {"host": "corp.example.evil"})[0] == 421
        # Listing names replaces the defaults: loopback names then need listing too.
        assert _request(proxy, "GET", "/health", None, {"host": "localhost"})[0] == 421


# --- values that end up in response headers ---------------------------------------------


class OddTags:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        ctx.tags.extend(["タグ", "evil\r\nset-cookie: stolen=1", "ok"])


@pytest.mark.parametrize("model", ["mock/日本", "mock/a\r\nx-injected: 1", "mock/ümlaut",
                                   "mock/a\nb", "mock/50%"])
def test_header_values_are_encoded_safely(upstream, tmp_path, model):
    with _serving(upstream, tmp_path, ("odd_tags", OddTags())) as proxy:
        status, headers, body = _request(
            proxy, "POST", OPENAI, json.dumps({"model": model, "messages": HI}).encode(),
            {"content-type": "application/json"})
        assert status == 200, body
        assert "x-injected" not in {k.lower() for k in headers}
        assert "set-cookie" not in {k.lower() for k in headers}
        shown = headers["x-hookproxy-model"]
        assert shown.isascii() and "\r" not in shown and "\n" not in shown
        from urllib.parse import unquote

        assert unquote(shown) == model.split("/", 1)[1]
        assert unquote(headers["x-hookproxy-tags"]).split(",") == [
            "タグ", "evil\r\nset-cookie: stolen=1", "ok"]
        _still_served(proxy)
    assert [r["status"] for r in _records(tmp_path)] == [200, 200]


# --- plugins with statuses that are not error statuses ----------------------------------


class OddStatus:
    def __init__(self, status: Any) -> None:
        self.status = status

    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        raise Reject(self.status, "go away", headers={"bad name": "x", "x-ok": "é\r\nx: y"})


@pytest.mark.parametrize("status", [99, 101, 204, 304, 399, 600, 1000, -1, True, "403"])
def test_a_plugin_status_outside_400_599_is_a_500_naming_the_plugin(upstream, tmp_path,
                                                                    status):
    with _serving(upstream, tmp_path, ("odd_status", OddStatus(status))) as proxy:
        for endpoint in (OPENAI, ANTHROPIC):
            code, headers, body = _request(
                proxy, "POST", endpoint,
                json.dumps({"model": "gpt-test", "max_tokens": 5, "messages": HI}).encode(),
                {"content-type": "application/json"})
            assert code == 500
            message = _error_shape(endpoint, body)
            assert "tests.test_hostile_client" in message and repr(status) in message
            assert "go away" in message
            assert headers["x-ok"] == "%C3%A9%0D%0Ax: y" and "x" not in headers
    records = _records(tmp_path)
    assert [r["status"] for r in records] == [500, 500]
    assert records[0]["error"]["type"] == "plugin_error"


def test_a_plugin_status_in_range_is_kept(upstream, tmp_path):
    with _serving(upstream, tmp_path, ("odd_status", OddStatus(418))) as proxy:
        code, _, body = _request(proxy, "POST", OPENAI, json.dumps(
            {"model": "gpt-test", "messages": HI}).encode(), {"content-type": "application/json"})
        assert code == 418 and _error_shape(OPENAI, body) == "go away"


# --- a client that leaves mid-upload ----------------------------------------------------


def test_a_client_leaving_mid_upload_is_a_499(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                         b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
                         b'{"model": "mock-1", "mess')
            time.sleep(0.3)
        time.sleep(0.3)
        _still_served(proxy)
    records = _records(tmp_path)
    assert records[0]["status"] == 499
    assert records[0]["error"]["type"] == "client_disconnected"


# --- a client that leaves with requests pipelined ----------------------------------------


def _chat(model: str, stream: bool = False) -> bytes:
    body = json.dumps({"model": model, "stream": stream, "messages": HI}).encode()
    return _head(OPENAI, len(body)) + body


def _records_so_far(tmp_path: Path) -> list[dict[str, Any]]:
    return _records(tmp_path) if (tmp_path / "requests.jsonl").exists() else []


def _slow_upstream(upstream: Any) -> dict[str, Any]:
    # Long enough that only the proxy hanging up ends the -slow call before its 3 s.
    providers = upstream_config(upstream)["providers"]
    providers["oai"]["timeout"] = 10
    return providers


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_with_a_request_pipelined_cancels_the_running_one(
        upstream, tmp_path, capfd, stream):
    """A request at the provider with a second pipelined behind it, then the client
    leaves: the provider call is cancelled, as without the second; the first's record is
    a 499, the second, never run, has a 499 of its own; no traceback; and another
    client's record is written at once, not behind the abandoned answer's."""
    model = "x-drip" if stream else "x-slow"
    with _serving(upstream, tmp_path, providers=_slow_upstream(upstream)) as proxy:
        hung_up, calls = upstream.hung_up, upstream.count(model)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(_chat(f"oai/{model}", stream) + _chat("mock-1"))
            assert wait_for(lambda: upstream.count(model) > calls)
            if stream:  # the answer has begun
                got = b""
                while b"data: " not in got:
                    got += sock.recv(65536)
        _still_served(proxy)
        # (Without the provider call cancelled, a -slow call lasts 3 s, -drip's 3 s more.)
        assert wait_for(lambda: len(_records_so_far(tmp_path)) == 3, timeout=2.5)
        assert wait_for(lambda: upstream.hung_up == hung_up + 1, timeout=5)
    records = _records(tmp_path)
    by_model = {r.get("model"): r for r in records}
    running, queued, other = by_model[f"oai/{model}"], by_model[None], by_model["mock-1"]
    assert running["status"] == 499 and running["error"]["type"] == "client_disconnected"
    assert queued["status"] == 499
    assert queued["endpoint"] == OPENAI and queued["format"] == "openai"
    assert queued["error"]["type"] == "client_disconnected"
    assert queued["error"]["message"] == "The client left before the request was run"
    assert other["status"] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_refused_request_pipelined_behind_one_whose_client_leaves_is_recorded(
        upstream, tmp_path):
    """A stream, then a request the parser refuses (its answer waits for the stream's
    end), then the client resets the connection: the stream's provider call is
    cancelled, and the refused request, whose answer never goes out, has a 499 record
    naming why it was refused."""
    bad = _chat("mock-1").replace(b"content-type:", b"x-bad: a\x00b\r\ncontent-type:")
    with _serving(upstream, tmp_path, providers=_slow_upstream(upstream)) as proxy:
        hung_up = upstream.hung_up
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(_chat("oai/x-drip", stream=True) + bad)
            got = b""
            while b"data: " not in got:
                got += sock.recv(65536)
            # A reset: the proxy, reading no more, learns of it when it next writes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert wait_for(lambda: upstream.hung_up == hung_up + 1, timeout=5)
        _still_served(proxy)
        assert wait_for(lambda: len(_records_so_far(tmp_path)) == 3)
    by_model = {r.get("model"): r for r in _records(tmp_path)}
    assert [by_model[m]["status"] for m in ("oai/x-drip", None, "mock-1")] == [499, 499, 200]
    refused = by_model[None]
    assert refused["endpoint"] == OPENAI and refused["error"]["type"] == "client_disconnected"
    assert "Invalid header value char" in refused["error"]["message"]


def test_a_client_closing_behind_a_refused_pipelined_request_is_seen(upstream, tmp_path):
    """A request at the provider, a request the parser refuses behind it, then the client
    closes its side: the proxy still reads (dropping what comes), sees the close, cancels
    the call and records both as 499s."""
    bad = _chat("mock-1").replace(b"content-type:", b"x-bad: a\x00b\r\ncontent-type:")
    with _serving(upstream, tmp_path, providers=_slow_upstream(upstream)) as proxy:
        hung_up = upstream.hung_up
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(_chat("oai/x-slow") + bad)
            time.sleep(0.3)
        assert wait_for(lambda: upstream.hung_up == hung_up + 1, timeout=6)
        assert wait_for(lambda: len(_records_so_far(tmp_path)) == 2)
        _still_served(proxy)
    by_model = {r.get("model"): r for r in _records(tmp_path)}
    assert by_model["oai/x-slow"]["status"] == 499
    assert by_model[None]["status"] == 499
    assert by_model[None]["error"]["type"] == "client_disconnected"


# --- numeric parameters -----------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "fields", "named"), [
    (OPENAI, {"max_tokens": -1}, "max_tokens"),
    (OPENAI, {"max_tokens": 0}, "max_tokens"),
    (OPENAI, {"max_tokens": 10**8}, "max_tokens"),
    (OPENAI, {"max_completion_tokens": -5}, "max_completion_tokens"),
    (OPENAI, {"temperature": 5}, "temperature"),
    (OPENAI, {"temperature": -0.5}, "temperature"),
    (OPENAI, {"top_p": 1.5}, "top_p"),
    (OPENAI, {"n": 1000}, "n"),
    (OPENAI, {"n": "2"}, "n"),
    (OPENAI, {"presence_penalty": 9}, "presence_penalty"),
    (ANTHROPIC, {"max_tokens": -1}, "max_tokens"),
    (ANTHROPIC, {"max_tokens": 10**8}, "max_tokens"),
    (ANTHROPIC, {"max_tokens": 5, "top_k": -1}, "top_k"),
    (ANTHROPIC, {"max_tokens": 5, "temperature": 1e300}, "temperature"),
    (OPENAI, {"max_tokens": True}, "max_tokens"),
    (OPENAI, {"temperature": True}, "temperature"),
    (ANTHROPIC, {"max_tokens": 5, "top_p": False}, "top_p"),
])
def test_numeric_parameters_out_of_range_are_a_400_naming_the_field(proxy, endpoint, fields,
                                                                     named):
    body = {"model": "mock-1", "messages": HI, **fields}
    status, _, answer = post_raw(proxy.url + endpoint, json.dumps(body).encode())
    assert status == 400
    assert named in _error_shape(endpoint, answer)


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
@pytest.mark.parametrize("value", [b"-100000000000000000000000000000",
                                   b"100000000000000000000000000000", b"1e400"])
def test_huge_max_tokens_literals_are_a_400(proxy, endpoint, value):
    body = b'{"model": "mock-1", "messages": [], "max_tokens": ' + value + b"}"
    status, _, answer = post_raw(proxy.url + endpoint, body)
    assert status == 400
    # 1e400 is out of range for the JSON decoder itself, which names its position.
    assert "max_tokens" in _error_shape(endpoint, answer) or value == b"1e400"


# --- header floods and slow headers -----------------------------------------------------


def test_oversized_headers_get_a_431_and_the_connection_closes(upstream, tmp_path):
    with _serving(upstream, tmp_path, server={"max_header_bytes": 8192}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: ")
            with pytest.raises(OSError):
                for _ in range(200):  # up to 2 MB; the proxy stops it long before
                    sock.sendall(b"a" * 10_000)
                    time.sleep(0.001)
                raise AssertionError("the proxy kept reading")
            answer = b""
            with suppress(OSError):
                answer = sock.recv(1000)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
        _still_served(proxy)
        # A header block under the cap is served.
        assert _request(proxy, "GET", "/health", None, {"x-fine": "a" * 4000})[0] == 200


@pytest.mark.parametrize("shape", ["one header", "many headers", "long url"])
def test_headers_past_the_cap_in_one_read_get_a_431(upstream, tmp_path, shape):
    """A whole header block past the cap, sent at once (so that it may be parsed to its end
    in one read): a 431 all the same, and the connection closes. One just under the cap
    on the same terms is served."""
    cap = 8192

    def head(size: int) -> bytes:
        start = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        if shape == "long url":
            start = b"GET /health?q=" + b"a" * size + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            return start + b"\r\n"
        if shape == "one header":
            return start + b"x-big: " + b"a" * size + b"\r\n\r\n"
        return start + b"".join(b"x-%d: a\r\n" % n for n in range(size // 10)) + b"\r\n"

    with _serving(upstream, tmp_path, server={"max_header_bytes": cap}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(head(cap + 200))
            assert _read_answer(sock).startswith(b"HTTP/1.1 431 ")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(head(cap - 400))
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        _still_served(proxy)


def test_a_431_on_an_openai_path_is_in_openai_format_whatever_its_headers(upstream, tmp_path):
    """Headers too large as a whole are all read before the 431: an anthropic-version
    among them does not make a Chat Completions client's error Anthropic's."""
    with _serving(upstream, tmp_path, server={"max_header_bytes": 8192}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                     b"anthropic-version: " + b"a" * 9000 + b"\r\n\r\n")
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(error) >= {"message", "type", "code"}


@pytest.mark.parametrize("path", ["/health", "/v1/chat/completions"])
def test_endless_trailers_of_a_chunked_body_are_capped(upstream, tmp_path, path):
    """A chunked body's trailers count against the header cap too: a client sending
    trailer lines without end gets a 431 and a closed connection, not a growing list."""
    body = json.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]})
    with _serving(upstream, tmp_path, server={"max_header_bytes": 8192}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                         b"content-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
                         % (path.encode(), len(body), body.encode()))
            with pytest.raises(OSError):
                for _ in range(2000):  # up to 4 MB of trailers; the cap is 8 KB
                    sock.sendall(b"x-t: b\r\n" * 256)
                    time.sleep(0.001)
                raise AssertionError("the proxy kept reading trailers")
        _still_served(proxy)


def test_uvicorn_has_the_code_connections_was_written_against():
    """proxy/connections.py copies uvicorn's ``data_received`` and builds on the parser
    callbacks and the request cycle of its httptools protocol (uvicorn 0.54, the range
    pyproject.toml pins). Another uvicorn with other code there fails here: read those
    methods again, adjust connections.py, then this digest. (``RequestResponseCycle.send``:
    connections._send writes an answer's start as it does. ``connection_lost``: a lost
    connection marks the newest cycle disconnected only while its answer is incomplete,
    the condition under which the guarded one marks the running cycle (which
    ``_start_asgi_task`` names) and tells its ClientGone; a disconnected cycle's
    ``send`` writes nothing, and its ``run_asgi`` answers no 500 and logs nothing.
    ``on_response_complete`` is copied, with the keep-alive timer armed lazily, which
    uvicorn's ``_unset_keepalive_if_required`` cancels only as the connection is lost.)"""
    import hashlib
    import inspect

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    protocol = HttpToolsProtocol
    relied_on = [protocol.data_received, protocol.on_message_begin, protocol.on_url,
                 protocol.on_header, protocol.on_headers_complete, protocol.on_message_complete,
                 protocol.on_response_complete, protocol.connection_lost,
                 protocol._unset_keepalive_if_required, protocol._start_asgi_task,
                 RequestResponseCycle.run_asgi, RequestResponseCycle.receive,
                 RequestResponseCycle.send]
    source = "".join(inspect.getsource(method) for method in relied_on)
    assert hashlib.sha256(source.encode()).hexdigest() == (
        "96dde9b41d691272b538a99ef9a73b4c9b1cf61aacb61fd4577625af9a70b3c6")


def test_slow_headers_and_idle_connections_are_closed_on_time(upstream, tmp_path):
    with _serving(upstream, tmp_path, server={"header_timeout": 1.0}) as proxy:
        idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        started = time.monotonic()
        _still_served(proxy)
        for sock in (idle, slow):
            with sock, suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # closed by the proxy
        assert time.monotonic() - started < 8


def test_slow_headers_of_a_later_request_on_a_connection_are_closed_on_time(upstream,
                                                                           tmp_path):
    """The header deadline is per request: requests answered on a kept-alive connection,
    the last one after the first request's deadline has passed, then one whose headers
    stop: the connection closes."""
    request = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    with _serving(upstream, tmp_path, server={"header_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(request)
            assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.6)
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        _still_served(proxy)
        with suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed by the proxy
        assert time.monotonic() - started < 8


def test_an_idle_kept_alive_connection_closes_after_the_keepalive_timeout(upstream,
                                                                         tmp_path):
    """The keep-alive wait starts again with each answer: a connection used within it
    stays open past the first wait's end, then closes once idle for the whole timeout."""
    request = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    with _serving(upstream, tmp_path, server={"keepalive_timeout": 2.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for _ in range(3):  # each within the wait the answer before began
            sock.sendall(request)
            assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
            answered = time.monotonic()
            time.sleep(1.2)
        with suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed by the proxy
        # Not at the end of an earlier answer's wait, 0.8 s after the last answer.
        assert time.monotonic() - answered > 1.5
        _still_served(proxy)


def _closed() -> bytes:
    raise AssertionError("the proxy closed the connection")


def test_a_request_begun_before_the_answer_before_it_is_not_cut_by_the_keepalive_wait(
        upstream, tmp_path):
    """The next request's first bytes came while the one before it was answered: the
    connection is not idle then, however long that request then takes."""
    def post(model: str) -> bytes:
        body = json.dumps({"model": model, "messages": HI}).encode()
        return _head(OPENAI, len(body)) + body

    def answer(sock: socket.socket) -> tuple[int, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or _closed()
        head, _, body = data.partition(b"\r\n\r\n")
        size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < size:
            body += sock.recv(65536) or _closed()
        return int(head.split()[1]), body

    first, second = post("oai/ka1-delay-300"), post("oai/ka1-delay-1200")
    with _serving(upstream, tmp_path, server={"keepalive_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(first)
        time.sleep(0.1)
        sock.sendall(second[:1])  # while the first is at the provider
        assert answer(sock)[0] == 200
        sock.sendall(second[1:])  # then the rest; its answer takes 1.2 s
        status, body = answer(sock)
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "echo: hello"
    assert [r["status"] for r in _records(tmp_path)] == [200, 200]


def test_a_bare_crlf_after_an_answer_does_not_keep_the_connection_open(upstream, tmp_path):
    """A CRLF between requests begins none (the parser skips it): the connection still
    closes once idle for the keep-alive timeout after its last answer."""
    with _serving(upstream, tmp_path, server={"keepalive_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert sock.recv(1000).startswith(b"HTTP/1.1 200 ")
        for _ in range(2):
            time.sleep(0.3)
            sock.sendall(b"\r\n")
        with suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed by the proxy (else a timeout after 10 s)
        _still_served(proxy)


# --- slow bodies ------------------------------------------------------------------------


def _read_answer(sock: socket.socket) -> bytes:
    """All the proxy sends until it closes the connection (within the socket timeout)."""
    answer = b""
    with suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _head(endpoint: str, length: int | None) -> bytes:
    size = b"content-length: %d" % length if length else b"transfer-encoding: chunked"
    return (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"%s\r\n\r\n" % (endpoint.encode(), size))


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
@pytest.mark.parametrize("how", ["stalled", "trickled", "chunked"])
def test_a_body_slower_than_body_timeout_is_a_408_and_the_connection_closes(
        upstream, tmp_path, endpoint, how):
    """Headers in time, then a body that stops, comes a byte at a time, or comes in
    small chunks without end: cut off at the deadline with a 408 in the client's format,
    while other clients are served."""
    with _serving(upstream, tmp_path, server={"body_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(_head(endpoint, None if how == "chunked" else 10_000)
                     + (b"" if how == "chunked" else b'{"model": "mock-1", "mess'))
        _still_served(proxy)  # while this one stalls
        with suppress(OSError):  # the proxy may close while this is still sending
            for _ in range(50 if how != "stalled" else 0):
                sock.sendall(b"3\r\n   \r\n" if how == "chunked" else b" ")
                time.sleep(0.1)
        answer = _read_answer(sock)  # and then the connection closes
        assert time.monotonic() - started < 8
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"connection: close" in head.lower()
        assert "did not arrive within 1 seconds" in _error_shape(endpoint, body)
        _still_served(proxy)
    records = _records(tmp_path)
    assert [r["status"] for r in records] == [200, 408, 200]
    assert records[1]["endpoint"] == endpoint
    assert records[1]["error"]["type"] == "request_timeout"


def test_a_body_in_time_is_served_on_a_kept_alive_connection(upstream, tmp_path):
    """The deadline is per request: two bodies, each slow but in time, on one connection
    that stays open longer than the deadline."""
    body = json.dumps({"model": "mock-1", "max_tokens": 5, "messages": HI}).encode()
    with _serving(upstream, tmp_path, server={"body_timeout": 1.0}) as proxy:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for _ in range(2):
            connection.putrequest("POST", OPENAI)
            connection.putheader("content-type", "application/json")
            connection.putheader("content-length", str(len(body)))
            connection.endheaders(body[:10])
            time.sleep(0.6)
            connection.send(body[10:])
            response = connection.getresponse()
            assert response.status == 200 and b"chat.completion" in response.read()
        connection.close()
    assert [r["status"] for r in _records(tmp_path)] == [200, 200]


def test_a_body_trickled_after_the_answer_does_not_hold_the_connection(upstream, tmp_path):
    """A route that answers without reading the body (GET /health): the connection closes
    at the body deadline rather than reading a trickle for ever."""
    with _serving(upstream, tmp_path, server={"body_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1000000"
                     b"\r\n\r\n")
        with suppress(OSError):
            for _ in range(80):
                sock.sendall(b" ")
                time.sleep(0.1)
        answer = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answer
        assert time.monotonic() - started < 8
        _still_served(proxy)


def test_a_slow_login_form_is_a_408(upstream, tmp_path):
    with _serving(upstream, tmp_path, server={"body_timeout": 1.0}) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /dashboard/login HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                     b"content-type: application/x-www-form-urlencoded\r\n"
                     b"content-length: 100\r\n\r\nkey=")
        answer = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert answer.endswith(b"The request body did not arrive within 1 seconds")
        _still_served(proxy)


# --- what the HTTP parser refuses -------------------------------------------------------


def _answers(sock: socket.socket) -> list[tuple[int, dict[str, str], bytes]]:
    """Every answer on a connection, in order, until the proxy closes it (the answers
    here carry a content-length)."""
    data = _read_answer(sock)
    answers = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        size = int(headers["content-length"])
        answers.append((int(status_line.split()[1]), headers, data[:size]))
        data = data[size:]
    return answers


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
def test_a_request_the_parser_refuses_is_answered_in_the_client_format_in_turn(
        upstream, tmp_path, endpoint):
    """A good request, then one with NUL in a header on the same connection: the first
    is answered, then the second gets a 400 in the client's format, with its record, and
    the connection closes."""
    body = json.dumps({"model": "mock-1", "max_tokens": 5, "messages": HI}).encode()
    good = _head(endpoint, len(body)) + body
    bad = good.replace(b"content-type:", b"x-bad: a\x00b\r\ncontent-type:")
    with _serving(upstream, tmp_path) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(good + bad)
        (first, _, _), (second, headers, answer) = _answers(sock)  # and then it closes
        assert (first, second) == (200, 400)
        assert "Invalid header value char" in _error_shape(endpoint, answer)
        assert headers["connection"] == "close"
        _still_served(proxy)
    records = proxy.settled(_records(tmp_path))
    assert [r["status"] for r in records] == [200, 400, 200]
    assert records[1]["id"] == headers["x-request-id"]
    assert records[1]["endpoint"] == endpoint
    assert records[1]["error"]["type"] == "invalid_http_request"


@pytest.mark.parametrize("endpoint", [OPENAI, ANTHROPIC])
def test_a_broken_chunked_body_is_a_400_with_one_record(upstream, tmp_path, endpoint):
    with _serving(upstream, tmp_path) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_head(endpoint, None) + b'5\r\n{"mod\r\nzz\r\n')
        ((status, headers, answer),) = _answers(sock)  # and then it closes
        assert status == 400
        assert "Invalid character in chunk size" in _error_shape(endpoint, answer)
        _still_served(proxy)
    records = _records(tmp_path)
    assert [r["status"] for r in records] == [400, 200]
    assert records[0]["id"] == headers["x-request-id"]
