"""Client keys and limits, the admin key, hostile input, faults, shutdown and reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.harness import ProxyServer, post_raw, upstream_config
from tests.test_cli import HOKPROXY_ENV_ROOT, _free_port

HI = [{"role": "user", "content": "hello"}]
KEYS = {"TEAM_A_KEY": "sk-team-a-0123456789abcdef", "TEAM_B_KEY": "sk-team-b-0123456789abcdef",
        "HP_ADMIN_KEY": "admin-secret-0123456789"}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    return KEYS


def _auth_config(upstream: Any, tmp_path: Path, **team_a: Any) -> dict[str, Any]:
    config = upstream_config(upstream)
    config["models"].append({"name": "priced", "provider": "oai", "model": "priced-model",
                             "input_price": 1000.0, "output_price": 1000.0})
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    config["auth"] = {
        "admin_key_env": "HP_ADMIN_KEY",
        "keys": {
            "team-a": {"key_env": "TEAM_A_KEY", "models": ["gpt-*", "mock-*"], **team_a},
            "team-b": {"key_env": "TEAM_B_KEY", "models": ["claude-*", "priced"],
                       "daily_budget": 0.03},
        },
    }
    return config


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]


def test_keys_models_and_the_log(upstream, tmp_path, keys):
    with ProxyServer(_auth_config(upstream, tmp_path)) as proxy:
        a = proxy.openai(api_key=keys["TEAM_A_KEY"])
        b = proxy.anthropic(api_key=keys["TEAM_B_KEY"])  # sends x-api-key
        assert a.chat.completions.create(model="gpt-test", messages=HI).choices
        assert b.messages.create(model="claude-test", max_tokens=9, messages=HI).content
        with pytest.raises(openai.PermissionDeniedError, match="may not use model 'claude"):
            a.chat.completions.create(model="claude-test", messages=HI)
        with pytest.raises(anthropic.PermissionDeniedError, match="may not use model 'gpt"):
            b.messages.create(model="gpt-test", max_tokens=9, messages=HI)
        with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
            proxy.openai(api_key="sk-wrong").chat.completions.create(model="gpt-test",
                                                                     messages=HI)
        status, _, body = post_raw(proxy.url + "/v1/messages", json.dumps(
            {"model": "claude-test", "max_tokens": 5, "messages": HI}).encode())
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert "Missing API key" in body["error"]["message"]
    records = _records(tmp_path)
    assert [r.get("caller") for r in records] == ["team-a", "team-b", "team-a", "team-b",
                                                  None, None]
    assert [r["status"] for r in records] == [200, 200, 403, 403, 401, 401]
    text = (tmp_path / "requests.jsonl").read_text()
    assert not any(secret in text for secret in KEYS.values())


def test_requests_per_minute(upstream, tmp_path, keys):
    with ProxyServer(_auth_config(upstream, tmp_path, rpm=3)) as proxy:
        client = proxy.openai(api_key=keys["TEAM_A_KEY"])
        for _ in range(3):
            client.chat.completions.create(model="gpt-test", messages=HI)
        with pytest.raises(openai.RateLimitError, match="3 requests per minute") as caught:
            client.chat.completions.create(model="gpt-test", messages=HI)
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
        # The other key has its own counters.
        proxy.openai(api_key=keys["TEAM_B_KEY"]).chat.completions.create(
            model="claude-test", messages=HI)


def test_tokens_per_minute(upstream, tmp_path, keys):
    with ProxyServer(_auth_config(upstream, tmp_path, tpm=30)) as proxy:
        client = proxy.openai(api_key=keys["TEAM_A_KEY"])
        # Each reserves its prompt (1 token, estimated) + max_tokens, and uses 18.
        client.chat.completions.create(model="gpt-test", messages=HI, max_tokens=5)
        client.chat.completions.create(model="gpt-test", messages=HI, max_tokens=5)  # 36
        with pytest.raises(openai.RateLimitError, match="30 tokens per minute"):
            client.chat.completions.create(model="gpt-test", messages=HI, max_tokens=5)
        # Without max_tokens, a request reserves [auth].reserve_output_tokens: too many.
        with pytest.raises(openai.RateLimitError, match="this request alone may use 4097"):
            client.chat.completions.create(model="gpt-test", messages=HI)


def test_daily_budget_and_spending_in_the_log(upstream, tmp_path, keys):
    with ProxyServer(_auth_config(upstream, tmp_path)) as proxy:
        client = proxy.anthropic(api_key=keys["TEAM_B_KEY"])
        client.messages.create(model="priced", max_tokens=9, messages=HI)  # 0.018
        client.messages.create(model="priced", max_tokens=9, messages=HI)  # 0.036 > 0.03
        with pytest.raises(anthropic.RateLimitError, match=r"daily budget of 0\.03") as caught:
            client.messages.create(model="priced", max_tokens=9, messages=HI)
        assert int(caught.value.response.headers["retry-after"]) > 0
    spent = [r["cost"] for r in _records(tmp_path) if r["status"] == 200]
    assert spent == [pytest.approx(0.018), pytest.approx(0.018)]


def test_the_dashboard_needs_the_admin_key(upstream, tmp_path, keys):
    with ProxyServer(_auth_config(upstream, tmp_path)) as proxy:
        def get(path: str, **headers: str) -> tuple[int, str, dict[str, str]]:
            request = urllib.request.Request(proxy.url + path, headers=headers)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=5) as response:
                    return response.status, response.read(1000).decode(), dict(response.headers)
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode(), dict(error.headers)

        for path in ("/dashboard", "/metrics", "/dashboard/events"):
            assert get(path)[0] == 401
            assert get(path, authorization=f"Bearer {keys['TEAM_A_KEY']}")[0] == 401
        assert get("/metrics", authorization=f"Bearer {keys['HP_ADMIN_KEY']}")[0] == 200
        status, page, _ = get("/dashboard")
        assert "admin key" in page and '<form method="post"' in page
        # The key is never taken from a URL: it would sit in history and proxy logs.
        assert get(f"/dashboard?key={keys['HP_ADMIN_KEY']}")[0] == 401

        def login(key: str) -> tuple[int, dict[str, str]]:
            request = urllib.request.Request(
                proxy.url + "/dashboard/login", method="POST",
                data=urllib.parse.urlencode({"key": key}).encode())
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=5) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as error:
                return error.code, dict(error.headers)

        assert login("wrong")[0] == 401
        status, headers = login(keys["HP_ADMIN_KEY"])
        assert status == 303
        cookie = headers["set-cookie"].split(";")[0]
        assert keys["HP_ADMIN_KEY"] not in cookie and "HttpOnly" in headers["set-cookie"]
        status, page, _ = get("/dashboard", cookie=cookie)
        assert status == 200 and "hookproxy" in page


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--host", "0.0.0.0",
                             "--port", str(_free_port())], cwd=HOKPROXY_ENV_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr and "[auth" in result.stderr


def test_too_many_messages_is_a_400(upstream):
    config = upstream_config(upstream, server={"max_messages": 3})
    with ProxyServer(config) as proxy, pytest.raises(openai.BadRequestError,
                                                     match="Too many messages: 4"):
        proxy.openai().chat.completions.create(model="mock-1", messages=HI * 4)


# --- faults -------------------------------------------------------------------------------


def test_a_client_leaving_mid_stream_cancels_the_upstream_call(upstream, tmp_path):
    config = upstream_config(upstream)
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    with ProxyServer(config) as proxy:
        before = upstream.hung_up
        stream = proxy.openai().chat.completions.create(
            model="oai/x-drip", messages=HI, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 5
        while upstream.hung_up == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.hung_up == before + 1
    (record,) = _records(tmp_path)
    assert record["status"] == 499 and record["error"]["type"] == "client_disconnected"
    assert record["chunks"] >= 3


def test_a_client_leaving_mid_request_cancels_the_upstream_call(upstream, tmp_path):
    config = upstream_config(upstream)
    config["providers"]["oai"]["timeout"] = 10
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    with ProxyServer(config) as proxy:
        before = upstream.hung_up
        with pytest.raises(openai.APITimeoutError):
            proxy.openai(timeout=0.5).chat.completions.create(model="oai/x-slow", messages=HI)
        time.sleep(3.2)
        assert upstream.hung_up == before + 1
    (record,) = _records(tmp_path)
    assert record["status"] == 499 and record["error"]["type"] == "client_disconnected"


@pytest.mark.parametrize("body", [
    b'{"id": "x", "choices": [',                       # malformed JSON
    b'{"id": "x", "choices": "nope"}',                  # wrong shape
    b"<html>bad gateway</html>",
])
def test_a_malformed_upstream_answer_is_a_clear_502(body):
    from aiohttp import web

    from tests.harness import ServedApp

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    with ServedApp({"/v1/chat/completions": handler}) as bad:
        config = {"providers": {"bad": {"type": "openai", "base_url": f"{bad.url}/v1"}},
                  "models": [{"name": "m", "provider": "bad"}], "log": {"path": ""},
                  "routing": {"retries": 0}}
        with ProxyServer(config) as proxy:
            with pytest.raises(openai.InternalServerError, match="invalid response") as e:
                proxy.openai().chat.completions.create(model="m", messages=HI)
            assert e.value.status_code == 502
            assert proxy.openai().models.list().data  # still serving


def test_a_malformed_upstream_stream_ends_with_an_error_event():
    from aiohttp import web

    from tests.harness import ServedApp

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"id":"x","choices":[{"delta":{"content":"hi"}}]}\n\n')
        await response.write(b"data: {this is not json}\n\n")
        return response

    with ServedApp({"/v1/chat/completions": handler}) as bad:
        config = {"providers": {"bad": {"type": "openai", "base_url": f"{bad.url}/v1"}},
                  "models": [{"name": "m", "provider": "bad"}], "log": {"path": ""},
                  "routing": {"retries": 0}}
        with ProxyServer(config) as proxy, \
                pytest.raises(anthropic.APIStatusError, match="malformed stream chunk"):
            # Before the first byte this is a 502; after it, an error event.
            list(proxy.anthropic().messages.create(model="m", max_tokens=5, messages=HI,
                                                   stream=True))


# --- shutdown and reload ------------------------------------------------------------------


def _serve(tmp_path: Path, config: str) -> tuple[subprocess.Popen[str], str]:
    path = tmp_path / "config.toml"
    path.write_text(config)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(HOKPROXY_ENV_ROOT)
    process = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config",
                                str(path), "--port", str(port)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(process.communicate()[0]) from None
            time.sleep(0.1)


MOCK_CONFIG = """
[providers.mock]
type = "mock"
chunk_delay = {delay}
[[models]]
name = "mock-1"
provider = "mock"
[log]
path = "requests.jsonl"
"""


def test_sigterm_lets_in_flight_requests_finish_and_flushes_the_log(tmp_path):
    process, url = _serve(tmp_path, MOCK_CONFIG.format(delay=0.05))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "one two three four five"}],
        stream=True)
    first = next(iter(stream))
    process.send_signal(signal.SIGTERM)
    rest = "".join(c.choices[0].delta.content or "" for c in stream)
    assert first is not None and "one two three four five" in rest
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    (record,) = _records(tmp_path)
    assert record["status"] == 200 and record["stream"] is True


def test_sighup_and_hookproxy_reload_apply_a_new_config_or_refuse_a_bad_one(tmp_path):
    process, url = _serve(tmp_path, MOCK_CONFIG.format(delay=0))
    models = lambda: [m["id"] for m in json.loads(  # noqa: E731
        urllib.request.urlopen(f"{url}/v1/models").read())["data"]]
    try:
        assert models() == ["mock-1"]
        config = tmp_path / "config.toml"
        config.write_text(config.read_text() + '[[models]]\nname = "mock-2"\nprovider = "mock"\n')
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while models() != ["mock-1", "mock-2"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert models() == ["mock-1", "mock-2"]
        good = config.read_text()
        config.write_text(good + "[server]\nportt = 1\n")  # a typo
        result = subprocess.run([sys.executable, "-m", "proxy.cli", "reload", "--config",
                                 str(config), "--url", url], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and "portt" in result.stderr
        process.send_signal(signal.SIGHUP)  # refused, the old config keeps serving
        time.sleep(0.5)
        assert models() == ["mock-1", "mock-2"]
        config.write_text(good + '[[models]]\nname = "mock-3"\nprovider = "mock"\n')
        result = subprocess.run([sys.executable, "-m", "proxy.cli", "reload", "--config",
                                 str(config), "--url", url], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0 and "reloaded" in result.stdout
        assert models() == ["mock-1", "mock-2", "mock-3"]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "reload refused" in output and "portt" in output
