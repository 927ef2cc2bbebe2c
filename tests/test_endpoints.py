"""The client's vendor headers, POST /v1/messages/count_tokens, and paths or methods that
nothing serves: through hookproxy as a real server, with the official SDKs as clients."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy import RequestContext, hookimpl
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, post_raw, upstream_config, wait_for
from tests.upstreams import COUNTED_TOKENS, FakeUpstream

HI = [{"role": "user", "content": "hello"}]
PROVIDER_KEY = "sk-ant-provider-key-0123456789"
OPENAI_PROVIDER_KEY = "sk-openai-provider-key-0123456789"
CLIENT_KEY = "sk-client-key-9876543210"


def _config(upstream: FakeUpstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    config = upstream_config(upstream, **extra)
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    # A model whose name differs from the provider's.
    config["models"].append({"name": "claude-alias", "provider": "ant", "model": "claude-real"})
    return config


def _records(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    path = tmp_path / "requests.jsonl"

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    wait_for(lambda: len(lines()) >= count)
    return [json.loads(line) for line in lines()]


def _header(headers: dict[str, str], name: str) -> str | None:
    """A header of what reached the fake upstream, whatever its case."""
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _send(url: str, method: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, status, got = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        raw, status, got = error.read(), error.code, dict(error.headers)
    return status, {k.lower(): v for k, v in got.items()}, json.loads(raw) if raw else None


@contextmanager
def _serving(config: dict[str, Any], *plugins: tuple[str, object]) -> Iterator[ProxyServer]:
    host = PluginHost()
    host.discover()
    for name, plugin in plugins:
        host.add(plugin, name)
    with ProxyServer(config, host=host) as server:
        yield server


# --- vendor headers ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_beta_and_the_clients_version_reach_an_anthropic_provider(
        upstream, proxy, stream):
    client = proxy.anthropic(default_headers={"anthropic-beta": "x-2025",
                                              "anthropic-version": "2099-01-01"})
    if stream:
        with client.messages.stream(model="claude-test", max_tokens=20, messages=HI) as s:
            s.get_final_message()
    else:
        client.messages.create(model="claude-test", max_tokens=20, messages=HI)
    sent = upstream.headers[-1]
    assert _header(sent, "anthropic-beta") == "x-2025"
    assert _header(sent, "anthropic-version") == "2099-01-01"


def test_without_the_clients_version_the_default_goes(upstream, proxy):
    status, _, _ = post_raw(proxy.url + "/v1/messages", json.dumps(
        {"model": "claude-test", "max_tokens": 5, "messages": HI}).encode())
    assert status == 200
    assert _header(upstream.headers[-1], "anthropic-version") == "2023-06-01"
    assert _header(upstream.headers[-1], "anthropic-beta") is None


def test_a_header_sent_twice_goes_once_with_both_values(upstream, proxy):
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        body = json.dumps({"model": "claude-test", "max_tokens": 5, "messages": HI}).encode()
        connection.putrequest("POST", "/v1/messages")
        for name, value in [("content-type", "application/json"),
                            ("content-length", str(len(body))),
                            ("anthropic-beta", "one-2025"), ("Anthropic-Beta", "two-2025")]:
            connection.putheader(name, value)
        connection.endheaders(body)
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert _header(upstream.headers[-1], "anthropic-beta") == "one-2025, two-2025"


def test_openai_vendor_headers_reach_an_openai_provider(upstream, proxy):
    client = proxy.openai(organization="org-123", project="proj-456",
                          default_headers={"OpenAI-Beta": "assistants=v2"})
    client.chat.completions.create(model="gpt-test", messages=HI)
    sent = upstream.headers[-1]
    assert _header(sent, "openai-organization") == "org-123"
    assert _header(sent, "openai-project") == "proj-456"
    assert _header(sent, "openai-beta") == "assistants=v2"


@pytest.mark.parametrize("stream", [False, True])
def test_another_formats_provider_gets_no_vendor_header(upstream, proxy, stream):
    client = proxy.openai(organization="org-123",
                          default_headers={"anthropic-beta": "x-2025",
                                           "anthropic-version": "2099-01-01"})
    client.chat.completions.create(model="claude-test", messages=HI, stream=stream)
    sent = upstream.headers[-1]
    assert _header(sent, "anthropic-beta") is None
    assert _header(sent, "anthropic-version") == "2023-06-01"
    assert _header(sent, "openai-organization") is None

    ant = proxy.anthropic(default_headers={"anthropic-beta": "x-2025",
                                           "openai-organization": "org-123"})
    ant.messages.create(model="gpt-test", max_tokens=20, messages=HI, stream=stream)
    sent = upstream.headers[-1]
    assert _header(sent, "anthropic-beta") is None
    assert _header(sent, "anthropic-version") is None
    assert _header(sent, "openai-organization") is None


def test_the_operators_headers_win(upstream, tmp_path):
    config = _config(upstream, tmp_path)
    config["providers"]["ant"]["headers"] = {"Anthropic-Beta": "operator-2025",
                                             "anthropic-version": "2024-01-01"}
    with ProxyServer(config) as proxy:
        client = proxy.anthropic(default_headers={"anthropic-beta": "x-2025",
                                                  "anthropic-version": "2099-01-01"})
        client.messages.create(model="claude-test", max_tokens=20, messages=HI)
    sent = upstream.headers[-1]
    assert [v for k, v in sent.items() if k.lower() == "anthropic-beta"] == ["operator-2025"]
    assert _header(sent, "anthropic-version") == "2024-01-01"


def test_the_clients_credentials_never_reach_a_provider(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("HP_TEST_ANT_KEY", PROVIDER_KEY)
    monkeypatch.setenv("HP_TEST_OAI_KEY", OPENAI_PROVIDER_KEY)
    config = _config(upstream, tmp_path)
    config["providers"]["ant"]["api_key_env"] = "HP_TEST_ANT_KEY"
    config["providers"]["oai"]["api_key_env"] = "HP_TEST_OAI_KEY"
    secret_headers = {"cookie": f"session={CLIENT_KEY}", "proxy-authorization": CLIENT_KEY,
                      "x-forwarded-for": "10.0.0.1"}
    with ProxyServer(config) as proxy:
        seen = len(upstream.headers)
        ant = proxy.anthropic(api_key=CLIENT_KEY, default_headers=secret_headers)
        ant.messages.create(model="claude-test", max_tokens=20, messages=HI)
        ant.messages.create(model="gpt-test", max_tokens=20, messages=HI)
        ant.messages.count_tokens(model="claude-test", messages=HI)
        oai = proxy.openai(api_key=CLIENT_KEY, default_headers=secret_headers)
        oai.chat.completions.create(model="gpt-test", messages=HI)
        oai.chat.completions.create(model="claude-test", messages=HI, stream=True)
    sent = upstream.headers[seen:]
    assert len(sent) == 5
    for headers in sent:
        for name, value in headers.items():
            assert CLIENT_KEY not in value, name
            assert name.lower() not in ("cookie", "proxy-authorization", "x-forwarded-for")
    ant_calls = [h for h in sent if _header(h, "x-api-key") is not None]
    assert len(ant_calls) == 3
    assert {_header(h, "x-api-key") for h in ant_calls} == {PROVIDER_KEY}
    oai_calls = [h for h in sent if _header(h, "authorization") is not None]
    assert {_header(h, "authorization") for h in oai_calls} == {f"Bearer {OPENAI_PROVIDER_KEY}"}


@pytest.mark.parametrize(("value", "why"), [
    ("b" * 9000, "longer than 8192 bytes"),
    ("caf\u00e9", "visible ASCII"),
])
def test_a_vendor_header_that_cannot_go_on_is_a_400_naming_it(upstream, proxy, value, why):
    body = json.dumps({"model": "claude-test", "max_tokens": 5, "messages": HI}).encode()
    status, _, answer = post_raw(proxy.url + "/v1/messages", body,
                                 {"anthropic-beta": value})
    assert status == 400
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "anthropic-beta" in answer["error"]["message"]
    assert why in answer["error"]["message"]


class ChangesHeaders:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        ctx.request.headers["anthropic-beta"] = "from-plugin"
        # Not a vendor header: never sent, whoever sets it.
        ctx.request.headers["x-api-key"] = "plugin-made-key"
        ctx.request.headers["anthropic-version"] = "bad\r\nx-injected: 1"


def test_a_plugin_may_change_the_vendor_headers(upstream, tmp_path):
    config = _config(upstream, tmp_path, plugins={"changes_headers": {}})
    with _serving(config, ("changes_headers", ChangesHeaders())) as proxy:
        client = proxy.anthropic(default_headers={"anthropic-beta": "x-2025"})
        client.messages.create(model="claude-test", max_tokens=20, messages=HI)
    sent = upstream.headers[-1]
    assert _header(sent, "anthropic-beta") == "from-plugin"
    assert _header(sent, "x-api-key") != "plugin-made-key"
    # A value no header can carry is left out: the default version goes.
    assert _header(sent, "anthropic-version") == "2023-06-01"
    assert _header(sent, "x-injected") is None


# --- POST /v1/messages/count_tokens -----------------------------------------------------


def test_count_tokens_is_forwarded_to_an_anthropic_provider(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        client = proxy.anthropic(default_headers={"anthropic-beta": "x-2025"})
        raw = client.messages.with_raw_response.count_tokens(
            model="claude-alias", messages=HI, system="Be brief.",
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
        assert raw.parse().input_tokens == COUNTED_TOKENS
        assert "x-hookproxy-estimate" not in raw.headers
        assert raw.headers["x-hookproxy-provider"] == "ant"
        assert raw.headers["x-hookproxy-model"] == "claude-real"
        # The client's fields as it sent them, with the provider's model name.
        assert upstream.last == {
            "model": "claude-real", "messages": HI, "system": "Be brief.",
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
        assert _header(upstream.headers[-1], "anthropic-beta") == "x-2025"
        [record] = _records(tmp_path, 1)
    assert record["endpoint"] == "/v1/messages/count_tokens"
    assert record["format"] == "anthropic" and record["status"] == 200
    assert record["model"] == "claude-alias"
    assert record["provider"] == "ant" and record["provider_model"] == "claude-real"
    assert [a["status"] for a in record["attempts"]] == [200]
    assert record["request"]["messages"] and "max_tokens" not in record["request"]


def test_the_beta_query_string_is_accepted(upstream, proxy):
    """Claude Code adds ``?beta=true`` to both paths."""
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "token-counting-2024-11-01"}
    status, _, answer = post_raw(
        proxy.url + "/v1/messages/count_tokens?beta=true",
        json.dumps({"model": "claude-test", "messages": HI}).encode(), headers)
    assert (status, answer) == (200, {"input_tokens": COUNTED_TOKENS})
    assert _header(upstream.headers[-1], "anthropic-beta") == "token-counting-2024-11-01"
    status, _, answer = post_raw(
        proxy.url + "/v1/messages?beta=true",
        json.dumps({"model": "claude-test", "max_tokens": 5, "messages": HI}).encode(),
        headers)
    assert status == 200 and answer["content"][0]["text"] == "echo: hello"


def test_the_sdks_beta_namespace(upstream, proxy):
    client = proxy.anthropic()
    counted = client.beta.messages.count_tokens(model="claude-test", messages=HI,
                                                betas=["token-counting-2024-11-01"])
    assert counted.input_tokens == COUNTED_TOKENS
    # (this SDK repeats the beta in the value it sends; it goes on as it came)
    assert "token-counting-2024-11-01" in _header(upstream.headers[-1], "anthropic-beta")
    answer = client.beta.messages.create(model="claude-test", max_tokens=20, messages=HI,
                                         betas=["context-management-2025-06-27"])
    assert answer.content[0].text == "echo: hello"
    assert "context-management-2025-06-27" in _header(upstream.headers[-1], "anthropic-beta")


@pytest.mark.parametrize("model", ["mock-1", "gpt-test"])
def test_count_tokens_is_an_estimate_for_a_target_that_does_not_count(
        upstream, proxy, model):
    seen = len(upstream.received)
    text = "a fairly long sentence to count " * 40
    raw = proxy.anthropic().messages.with_raw_response.count_tokens(
        model=model, messages=[{"role": "user", "content": text}])
    assert raw.headers["x-hookproxy-estimate"] == "true"
    count = raw.parse().input_tokens
    assert len(text) // 5 < count < len(text) // 3
    assert len(upstream.received) == seen  # nobody was asked


def test_count_tokens_refuses_a_key_as_messages_does(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("HP_TEST_TEAM_KEY", CLIENT_KEY)
    config = _config(upstream, tmp_path, auth={"keys": {"team": {
        "key_env": "HP_TEST_TEAM_KEY", "models": ["claude-*", "mock-*"]}}})
    with ProxyServer(config) as proxy:
        seen = len(upstream.received)
        for api_key, error, status in [("wrong-key", anthropic.AuthenticationError, 401),
                                       (CLIENT_KEY, anthropic.PermissionDeniedError, 403)]:
            client = proxy.anthropic(api_key=api_key)
            model = "gpt-test" if api_key == CLIENT_KEY else "claude-test"
            with pytest.raises(error) as on_messages:
                client.messages.create(model=model, max_tokens=5, messages=HI)
            with pytest.raises(error) as on_count:
                client.messages.count_tokens(model=model, messages=HI)
            assert on_count.value.status_code == on_messages.value.status_code == status
            assert on_count.value.body == on_messages.value.body
        status, _, answer = post_raw(proxy.url + "/v1/messages/count_tokens",
                                     json.dumps({"model": "claude-test",
                                                 "messages": HI}).encode())
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        assert len(upstream.received) == seen
        counted = proxy.anthropic(api_key=CLIENT_KEY).messages.count_tokens(
            model="claude-test", messages=HI)
        assert counted.input_tokens == COUNTED_TOKENS
        records = _records(tmp_path, 6)
    counts = [r for r in records if r["endpoint"] == "/v1/messages/count_tokens"]
    assert [r["status"] for r in counts] == [401, 403, 401, 200]
    assert counts[-1]["caller"] == "team"


def test_count_tokens_for_an_unknown_model_is_refused_as_messages_does(upstream, proxy):
    client = proxy.anthropic()
    with pytest.raises(anthropic.NotFoundError) as on_messages:
        client.messages.create(model="no-such-model", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.NotFoundError) as on_count:
        client.messages.count_tokens(model="no-such-model", messages=HI)
    assert on_count.value.body == on_messages.value.body
    assert on_count.value.body["type"] == "error"
    assert on_count.value.body["error"]["type"] == "not_found_error"


def test_count_tokens_passes_on_the_providers_error(upstream, proxy):
    with pytest.raises(anthropic.BadRequestError) as raised:
        proxy.anthropic().messages.count_tokens(model="ant/claude-status-400", messages=HI)
    assert "fake upstream says 400" in raised.value.body["error"]["message"]


def test_count_tokens_checks_its_input_as_messages_does(upstream, proxy):
    url = proxy.url + "/v1/messages/count_tokens"
    status, _, answer = post_raw(url, b"{not json")
    assert status == 400 and answer["type"] == "error"
    status, _, answer = _send(url, "POST", b"{}", {"content-type": "text/plain"})
    assert status == 415 and answer["type"] == "error"
    status, _, answer = post_raw(url, json.dumps({"model": "claude-test"}).encode())
    assert status == 400 and "messages" in answer["error"]["message"]


def test_count_tokens_counts_the_request_as_plugins_left_it(upstream, tmp_path):
    config = _config(upstream, tmp_path,
                     plugins={"system_prompt": {"text": "Operator's instruction."}})
    with ProxyServer(config) as proxy:
        proxy.anthropic().messages.count_tokens(model="claude-test", messages=HI,
                                                 extra_body={"hookproxy": {}})
    sent = upstream.last
    assert sent["system"] == "Operator's instruction."
    assert sent["messages"] == HI and sent["model"] == "claude-test"
    assert "max_tokens" not in sent and "hookproxy" not in sent


def test_count_tokens_answered_by_a_plugin_is_an_estimate(upstream, tmp_path):
    config = _config(upstream, tmp_path, plugins={"content_guard": {
        "patterns": ["forbidden"], "action": "refuse"}})
    with ProxyServer(config) as proxy:
        seen = len(upstream.received)
        raw = proxy.anthropic().messages.with_raw_response.count_tokens(
            model="claude-test", messages=[{"role": "user", "content": "forbidden words"}])
        assert raw.headers["x-hookproxy-estimate"] == "true"
        assert raw.parse().input_tokens >= 1
        assert len(upstream.received) == seen
        [record] = _records(tmp_path, 1)
    assert record["plugins"] == {"content_guard": "short_circuit"}


# --- paths and methods nothing serves ---------------------------------------------------


def test_an_unknown_path_is_a_404_in_the_openai_format(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v2", api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="gpt-test", messages=HI)
        error = raised.value.body
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "not_found_error" and error["code"] == "not_found"
        assert "/v2/chat/completions" in error["message"]
        assert "POST /v1/chat/completions" in error["message"]
        assert raised.value.response.headers["x-request-id"]
        [record] = _records(tmp_path, 1)
    assert record["status"] == 404 and record["endpoint"] == "/v2/chat/completions"
    assert record["format"] == "openai"
    assert record["id"] == raised.value.response.headers["x-request-id"]


def test_an_unknown_path_is_a_404_in_the_anthropic_format(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        client = anthropic.Anthropic(base_url=f"{proxy.url}/v2", api_key="k", max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as raised:
            client.messages.create(model="claude-test", max_tokens=5, messages=HI)
        body = raised.value.body
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        assert "/v2/v1/messages" in body["error"]["message"]
        # Judged by the path alone, without an anthropic-version header.
        status, _, answer = _send(proxy.url + "/v1/messages/batches", "POST", b"{}")
        assert status == 404 and answer["type"] == "error"
        records = _records(tmp_path, 2)
    assert [(r["status"], r["format"]) for r in records] == [(404, "anthropic")] * 2
    assert records[0]["endpoint"] == "/v2/v1/messages"


@pytest.mark.parametrize(("method", "path", "allow", "fmt"), [
    ("GET", "/v1/chat/completions", "POST", "openai"),
    ("PUT", "/v1/chat/completions", "POST", "openai"),
    ("GET", "/v1/messages", "POST", "anthropic"),
    ("GET", "/v1/messages/count_tokens", "POST", "anthropic"),
    ("DELETE", "/v1/models", "GET, HEAD", "openai"),
    ("POST", "/health", "GET, HEAD", "openai"),
])
def test_a_wrong_method_is_a_405_with_allow(upstream, tmp_path, method, path, allow, fmt):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        status, headers, answer = _send(proxy.url + path, method)
        [record] = _records(tmp_path, 1)
    assert status == 405 and headers["allow"] == allow
    if fmt == "anthropic":
        assert answer["type"] == "error" and method in answer["error"]["message"]
    else:
        assert answer["error"]["code"] == "method_not_allowed"
        assert method in answer["error"]["message"]
    assert (record["status"], record["endpoint"], record["format"]) == (405, path, fmt)


def test_the_anthropic_version_header_picks_the_anthropic_format(upstream, proxy):
    status, _, answer = _send(proxy.url + "/v1/complete", "POST", b"{}",
                              {"anthropic-version": "2023-06-01"})
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    assert answer["type"] == "error"
    status, _, answer = _send(proxy.url + "/v1/models", "POST", b"{}",
                                    {"anthropic-version": "2023-06-01"})
    assert status == 405 and answer["type"] == "error"


def test_a_long_path_is_cut_in_the_answer_and_the_record(upstream, tmp_path):
    path = "/v1/" + "x" * 5000
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        status, _, answer = _send(proxy.url + path, "GET")
        [record] = _records(tmp_path, 1)
    assert status == 404
    assert len(answer["error"]["message"]) < 600
    assert record["endpoint"] == path[:256] + "..."


def test_a_foreign_host_is_refused_in_the_clients_format_with_the_path_cut(upstream,
                                                                          tmp_path):
    foreign = {"host": "evil.example", "content-type": "application/json"}
    path = "/v1/" + "x" * 20_000
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        status, _, answer = _send(proxy.url + path, "POST", b"{}", foreign)
        assert status == 421 and answer["error"]["code"] == "host_not_allowed"
        # An Anthropic client (its anthropic-version header) gets Anthropic's shape, as a
        # 404 on the same path would be.
        for method, where in (("GET", "/v1/models"), ("POST", path)):
            status, _, answer = _send(proxy.url + where, method,
                                      b"{}" if method == "POST" else None,
                                      {**foreign, "anthropic-version": "2023-06-01"})
            assert status == 421 and answer["type"] == "error"
            assert answer["error"]["type"] == "invalid_request_error"
            assert "evil.example" in answer["error"]["message"]
        # An OpenAI endpoint's path is answered in OpenAI's format whatever the headers,
        # as the other refusals before an endpoint (431, 400) are.
        status, _, answer = _send(proxy.url + "/v1/chat/completions", "POST", b"{}",
                                  {**foreign, "anthropic-version": "2023-06-01"})
        assert status == 421 and answer["error"]["code"] == "host_not_allowed"
        records = _records(tmp_path, 3)
    assert [(r["status"], r["format"]) for r in records] == [(421, "openai"),
                                                             (421, "anthropic"),
                                                             (421, "openai")]
    assert [r["endpoint"] for r in records] == [path[:256] + "..."] * 2 + [
        "/v1/chat/completions"]


def test_other_routes_keep_their_answers(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        assert _send(proxy.url + "/health", "GET")[0] == 200
        assert _send(proxy.url + "/v1/models", "GET")[0] == 200
        request = urllib.request.Request(proxy.url + "/dashboard")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/html")
        # What a browser asks for beside the dashboard: no icon, no record.
        assert _send(proxy.url + "/favicon.ico", "GET")[0] == 204
        # A Host that is not allowed is still refused before anything else.
        status, _, answer = _send(proxy.url + "/nowhere", "GET",
                                  headers={"host": "evil.example"})
        assert status == 421 and answer["error"]["code"] == "host_not_allowed"
    assert _records(tmp_path, 0) == []  # none of these is an API request


# --- an answer's head on the wire ---------------------------------------------------------


class SetsAHeader:
    @hookimpl
    def request_start(self, ctx: RequestContext) -> None:
        ctx.response_headers["X-Quota"] = "7 left; résumé"


def _heads(sock: Any, count: int) -> list[tuple[list[bytes], bytes]]:
    """``count`` answers read off ``sock``: each head's lines, and its body (by its
    Content-Length, or by its chunks)."""
    data = b""
    answers = []
    for _ in range(count):
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        if b"content-length" in fields:
            size = int(fields[b"content-length"])
            while len(data) < size:
                data += sock.recv(65536)
            body, data = data[:size], data[size:]
        else:
            while b"\r\n0\r\n\r\n" not in data:
                data += sock.recv(65536)
            body, _, data = data.partition(b"\r\n0\r\n\r\n")
        answers.append((lines, body))
    return answers


def test_an_answers_head_on_the_wire(upstream, tmp_path):
    """What an API answer's head holds, in order, byte for byte as before hookproxy wrote
    it itself: uvicorn's date and server, a plugin's header (its value made safe),
    hookproxy's own, the length and type; kept alive until the client says close, and a
    stream's chunked."""
    import socket

    config = _config(upstream, tmp_path, plugins={"sets": {}})

    def post(body: dict[str, Any], close: bool = False) -> bytes:
        data = json.dumps(body).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                % (len(data), b"connection: close\r\n" if close else b"", data))

    plain = {"model": "gpt-test", "messages": HI}
    with _serving(config, ("sets", SetsAHeader())) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(post(plain) + post({**plain, "stream": True}) + post(plain, close=True))
        answers = _heads(sock, 3)
        assert sock.recv(100) == b""  # closed after the third, as asked
    for (lines, body), kind in zip(answers, ["plain", "stream", "closed"], strict=True):
        assert lines[0] == b"HTTP/1.1 200 OK"
        names = [line.split(b": ", 1)[0] for line in lines[1:]]
        framing = {"plain": [b"content-length", b"content-type"],
                   "stream": [b"content-type", b"transfer-encoding"],
                   "closed": [b"content-length", b"content-type", b"connection"]}[kind]
        assert names == [b"date", b"server", b"x-quota", b"x-request-id",
                         b"x-hookproxy-provider", b"x-hookproxy-model",
                         b"x-hookproxy-overhead-ms", b"x-hookproxy-attempts", *framing]
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        assert fields[b"x-quota"] == b"7 left; r%C3%A9sum%C3%A9"
        assert fields[b"x-hookproxy-provider"] == b"oai"
        if kind == "stream":
            assert fields[b"content-type"] == b"text/event-stream; charset=utf-8"
            assert b"data: [DONE]" in body
        else:
            assert fields[b"content-type"] == b"application/json"
            assert json.loads(body)["object"] == "chat.completion"
