"""The admin surface from an attacker's side: sessions, the login form, throttling, CSRF,
browser protections on the dashboard, and what /health tells strangers. Each case also
checks that API traffic is still served and logged."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from tests.harness import ProxyServer, upstream_config

ADMIN = "admin-secret-0123456789"
TEAM = "sk-team-a-0123456789abcdef"
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HP_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("TEAM_A_KEY", TEAM)


def _config(upstream: Any, tmp_path: Path, **auth: Any) -> dict[str, Any]:
    config = upstream_config(upstream)
    config["log"] = {"path": str(tmp_path / "requests.jsonl")}
    config["auth"] = {"admin_key_env": "HP_ADMIN_KEY",
                      "keys": {"team-a": {"key_env": "TEAM_A_KEY"}}, **auth}
    return config


@contextmanager
def _serving(upstream: Any, tmp_path: Path, **auth: Any) -> Iterator[ProxyServer]:
    with ProxyServer(_config(upstream, tmp_path, **auth)) as proxy:
        yield proxy
    records = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == 200 for r in records)  # the API kept serving


def _served(proxy: ProxyServer) -> None:
    reply = proxy.openai(api_key=TEAM).chat.completions.create(model="mock-1", messages=HI)
    assert reply.choices


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _call(proxy: ProxyServer, path: str, method: str = "GET", data: bytes | None = None,
          **headers: str) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(proxy.url + path, method=method, data=data,
                                     headers=headers)
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=5) as response:
            return (response.status, {k.lower(): v for k, v in response.headers.items()},
                    response.read().decode())
    except urllib.error.HTTPError as error:
        return (error.code, {k.lower(): v for k, v in error.headers.items()},
                error.read().decode())


def _login(proxy: ProxyServer, key: str, **headers: str) -> tuple[int, dict[str, str], str]:
    return _call(proxy, "/dashboard/login", "POST",
                 urllib.parse.urlencode({"key": key}).encode(), **headers)


def _cookie(headers: dict[str, str]) -> str:
    return headers["set-cookie"].split(";")[0]


def test_each_login_gets_its_own_session_cookie(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        first, second = _login(proxy, ADMIN), _login(proxy, ADMIN)
        assert first[0] == second[0] == 303
        cookie = first[1]["set-cookie"]
        assert _cookie(first[1]) != _cookie(second[1])
        assert ADMIN not in cookie
        lowered = cookie.lower()
        assert "httponly" in lowered and "samesite=strict" in lowered
        assert "max-age=43200" in lowered and "secure" not in lowered  # plain http here
        for answer in (first, second):
            assert _call(proxy, "/metrics", cookie=_cookie(answer[1]))[0] == 200
        assert _call(proxy, "/metrics", cookie="hookproxy_admin=" + "0" * 64)[0] == 401
        _served(proxy)


def test_a_session_expires(upstream, tmp_path):
    with _serving(upstream, tmp_path, admin_session_ttl=0.5) as proxy:
        _, headers, _ = _login(proxy, ADMIN)
        assert _call(proxy, "/metrics", cookie=_cookie(headers))[0] == 200
        import time

        time.sleep(1.0)
        assert _call(proxy, "/metrics", cookie=_cookie(headers))[0] == 401
        _served(proxy)


def test_the_cookie_is_secure_behind_tls(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        # uvicorn trusts X-Forwarded-Proto from loopback (a local TLS terminator).
        _, headers, _ = _login(proxy, ADMIN, **{"x-forwarded-proto": "https"})
        assert "secure" in headers["set-cookie"].lower()
        _served(proxy)


def test_a_new_admin_key_ends_every_session(upstream, tmp_path, monkeypatch):
    with _serving(upstream, tmp_path) as proxy:
        _, headers, _ = _login(proxy, ADMIN)
        assert _call(proxy, "/metrics", cookie=_cookie(headers))[0] == 200
        monkeypatch.setenv("HP_ADMIN_KEY", "a-new-admin-key-987654321")
        proxy.gateway.reload(parse_config(_config(upstream, tmp_path), "test-config.toml"))
        assert _call(proxy, "/metrics", cookie=_cookie(headers))[0] == 401
        status, _, _ = _call(proxy, "/admin/reload", "POST", b"", cookie=_cookie(headers))
        assert status in (401, 403)
        assert _call(proxy, "/metrics", authorization=f"Bearer {ADMIN}")[0] == 401
        _served(proxy)


def test_the_key_in_a_url_is_not_accepted(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        status, headers, page = _call(proxy, f"/dashboard?key={ADMIN}")
        assert status == 401 and "set-cookie" not in headers
        assert '<form method="post" action="/dashboard/login">' in page
        _served(proxy)


def test_failed_logins_are_throttled(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        statuses = [_login(proxy, f"guess-{i}")[0] for i in range(8)]
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
        status, headers, page = _login(proxy, ADMIN)  # even the right key waits now
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 61
        assert "wait" in page
        # Bearer guesses count too.
        status, _, body = _call(proxy, "/metrics", authorization="Bearer guess")
        assert status == 429 and json.loads(body)["error"]["code"] == "admin_key_throttled"
        _served(proxy)


def test_admin_posts_need_the_csrf_token_or_the_bearer_key(upstream, tmp_path):
    with _serving(upstream, tmp_path) as proxy:
        _, headers, _ = _login(proxy, ADMIN)
        cookie = _cookie(headers)
        status, _, body = _call(proxy, "/admin/reload", "POST", b"", cookie=cookie)
        assert status == 403 and json.loads(body)["error"]["code"] == "csrf_token_required"
        status, _, page = _call(proxy, "/dashboard", cookie=cookie)
        csrf = page.split('name="hookproxy-csrf" content="')[1].split('"')[0]
        status, _, body = _call(proxy, "/admin/reload", "POST", b"", cookie=cookie,
                                **{"x-csrf-token": csrf})
        # Past the guard: the reload itself runs (the test config has no file to re-read).
        assert json.loads(body)["status"] == "refused" and "file not found" in body
        _, _, body = _call(proxy, "/admin/reload", "POST", b"", authorization=f"Bearer {ADMIN}")
        assert json.loads(body)["status"] == "refused"
        # From another site's page, not even with the token.
        status, _, _ = _call(proxy, "/admin/reload", "POST", b"", cookie=cookie,
                             origin="http://attacker.example", **{"x-csrf-token": csrf})
        assert status == 403
        _served(proxy)


def test_a_cross_site_admin_post_is_refused_without_keys(upstream, tmp_path):
    config = upstream_config(upstream)
    with ProxyServer(config) as proxy:
        status, _, body = _call(proxy, "/admin/reload", "POST", b"",
                                origin="http://attacker.example",
                                **{"sec-fetch-site": "cross-site"})
        assert status == 403 and json.loads(body)["error"]["code"] == "cross_origin"
        # As hookproxy reload sends it: past the guard, to the reload itself.
        assert json.loads(_call(proxy, "/admin/reload", "POST", b"")[2])["status"] == "refused"
        reply = proxy.openai().chat.completions.create(model="mock-1", messages=HI)
        assert reply.choices


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/static/dashboard.js"])
def test_dashboard_responses_carry_browser_protections(upstream, tmp_path, path):
    with _serving(upstream, tmp_path) as proxy:
        _, headers, _ = _login(proxy, ADMIN)
        for cookie in (_cookie(headers), ""):  # signed in, and the login page
            _, got, _ = _call(proxy, path, cookie=cookie)
            assert got["x-frame-options"] == "DENY"
            assert got["referrer-policy"] == "no-referrer"
            csp = got["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        _served(proxy)


def test_health_tells_strangers_only_ok(upstream, tmp_path):
    config = _config(upstream, tmp_path)
    config["providers"]["secret"] = {"type": "openai", "api_key_env": "UNSET_KEY_FOR_TEST"}
    with ProxyServer(config) as proxy:
        for auth in ({}, {"authorization": f"Bearer {TEAM}"}):
            status, _, body = _call(proxy, "/health", **auth)
            assert status == 200 and json.loads(body) == {"status": "ok"}
        status, _, body = _call(proxy, "/health", authorization=f"Bearer {ADMIN}")
        assert "UNSET_KEY_FOR_TEST" in json.loads(body)["skipped_providers"]["secret"]
        _served(proxy)
