"""The request log from an attacker's side: who may read it on disk, whether secrets a
client tucks away at any depth reach it, and whether its content can take over the
operator's terminal through ``hookproxy tail``."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logwriter import LogWriter
from proxy.record import is_secret_key, may_name_secret
from proxy.tail import Filters, tail
from tests.harness import ProxyServer, post_raw, upstream_config

HI = [{"role": "user", "content": "hello"}]
SECRET = "sk-live-do-not-log-0123456789"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _served(proxy: ProxyServer) -> None:
    reply = proxy.openai().chat.completions.create(model="mock-1", messages=HI)
    assert "hello" in reply.choices[0].message.content


def test_the_log_folder_is_0700_and_its_files_0600(upstream, tmp_path):
    log = tmp_path / "fresh" / "logs" / "requests.jsonl"
    config = upstream_config(upstream, log={"path": str(log), "max_bytes": 2000, "keep": 2})
    old_umask = os.umask(0o022)
    try:
        with ProxyServer(config) as proxy:
            for _ in range(10):  # enough to rotate
                _served(proxy)
    finally:
        os.umask(old_umask)
    assert _mode(log.parent) == 0o700
    files = sorted(log.parent.iterdir())
    assert len(files) >= 2  # rotated
    assert all(_mode(f) == 0o600 for f in files), [oct(_mode(f)) for f in files]
    records = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert records and all(r["status"] == 200 for r in records)  # keep = 2: not all 10


def test_an_existing_wider_log_file_is_narrowed(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text("")
    path.chmod(0o644)
    writer = LogWriter(path)
    writer.start()
    writer.submit(b'{"id": "x"}\n')
    writer.close()
    assert _mode(path) == 0o600 and path.read_text() == '{"id": "x"}\n'


@pytest.mark.parametrize("bodies", ["truncated", "full"])
def test_secrets_at_any_depth_are_scrubbed(upstream, tmp_path, bodies):
    log = tmp_path / "requests.jsonl"
    config = upstream_config(upstream, log={"path": str(log), "bodies": bodies})
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello", "auth_token": SECRET}],
        "metadata": {"api_key": SECRET, "nested": [{"password": SECRET,
                                                    "clientSecret": SECRET}]},
        "max_tokens": 7,
    }
    with ProxyServer(config) as proxy:
        status, _, answer = post_raw(proxy.url + "/v1/chat/completions",
                                     json.dumps(body).encode())
        assert status == 200 and answer["choices"]
        _served(proxy)
    text = log.read_text()
    assert SECRET not in text
    records = [json.loads(x) for x in text.splitlines()]
    assert [r["status"] for r in records] == [200, 200]
    request: dict[str, Any] = records[0]["request"]
    assert "[redacted]" in json.dumps(request)
    assert request["max_tokens"] == 7  # a count, not a secret


def test_tail_escapes_control_characters(upstream, tmp_path):
    log = tmp_path / "requests.jsonl"
    config = upstream_config(upstream, log={"path": str(log)})
    hostile = "mock/\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil"
    with ProxyServer(config) as proxy:
        status, _, _ = post_raw(proxy.url + "/v1/chat/completions", json.dumps(
            {"model": hostile, "messages": HI}).encode())
        assert status == 200
        status, _, _ = post_raw(proxy.url + "/v1/chat/completions", json.dumps(
            {"model": "nope\x1b[31m", "messages": HI}).encode())
        assert status == 404
        _served(proxy)
    # What `hookproxy tail --file LOG --no-follow` runs (main() would point the app's
    # logging at this test's captured stderr for good).
    out = io.StringIO()
    assert tail(log, Filters(), last=10, follow=False, colour=False, out=out) == 0
    shown = out.getvalue()
    assert len(shown.splitlines()) == 3
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in shown
    assert "\\x1b]0;pwned\\x07" in shown and "\\u202eevil" in shown and "nope\\x1b[31m" in shown


# Names as clients write them: words, any case, joined by _ - . or camelCase, often
# ending in a count's "_tokens".
_WORDS = ["key", "api", "token", "tokens", "max", "auth", "secret", "password", "input",
          "cookie", "credentials", "x", "client", "pass", "id", "keys", "AUTH", "Token"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(max_size=30),
    st.builds(lambda words, sep, tail: sep.join(words) + tail,
              st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4),
              st.sampled_from(["_", "-", ".", ""]), st.sampled_from(["", "_tokens", "Tokens"]))))
def test_the_quick_secret_check_misses_no_secret_key(name):
    # The record embeds a body as encoded when this check finds nothing: it must see
    # every key is_secret_key calls a secret, at any depth, beside token counts.
    body = msgspec.json.encode({"max_tokens": 5, "usage": {"input_tokens": 1},
                                "a": [{name: "value"}]})
    if is_secret_key(name):
        assert may_name_secret(body), name


def test_a_secret_named_like_a_count_is_still_scrubbed(upstream, tmp_path):
    log = tmp_path / "requests.jsonl"
    config = upstream_config(upstream, log={"path": str(log)})
    body = {"model": "gpt-test", "max_tokens": 7,
            "messages": [{"role": "user", "content": "hello"}],
            "metadata": {"auth_tokens": SECRET, "output_tokens": 3}}
    with ProxyServer(config) as proxy:
        status, _, _ = post_raw(proxy.url + "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200
        _served(proxy)
    text = log.read_text()
    assert SECRET not in text
    request = json.loads(text.splitlines()[0])["request"]
    assert request["extra"]["metadata"] == {"auth_tokens": "[redacted]", "output_tokens": 3}
