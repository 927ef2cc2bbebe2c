"""Bounded memory, and per-message work memoized without changing a result.

Memoized answers (classifier tags, redaction masks, guard verdicts) equal fresh ones,
through a live server: the same conversation is sent with an empty memo, again with the
memo full of it, and once more with one message in the middle changed. The dashboard's
replay buffer, the records, the memo and /metrics stay under their bounds under floods of
large or distinct requests.
"""

from __future__ import annotations

import copy
import gc
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from proxy import Message, Request, RequestContext, hookimpl
from proxy import memo as memo_module
from proxy.connections import ClientGone
from proxy.memo import Memo, memo
from proxy.plugins import PluginHost
from tests.harness import ProxyServer, post_raw, upstream_config, wait_for

LONG = " and more words to make the message long enough to be remembered" * 8

CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Hello, I have a question about an invoice. " + LONG},
    {"role": "assistant", "content": "Sure, what is the ticket number? " + LONG},
    {"role": "user", "content": "It is ABC-123; mail me at ann.lee@example.com " + LONG},
    {"role": "assistant", "content": "Thanks, found it. " + LONG},
    {"role": "user", "content": "Also here is code:\ndef f(x):\n    return x\n" + LONG},
    {"role": "assistant", "content": "Looks fine. Call +1 415 555 0199 if needed. " + LONG},
    {"role": "user", "content": "Last question, in plain words. " + LONG},
]

CONFIG: dict[str, Any] = {
    "plugins": {"redact": {"restore": False},
                "content_guard": {"patterns": ["(?i)forbidden phrase"]}},
    "classifiers": {"keyword": {"tags": {"billing": ["invoice"], "legal": ["contract"]}},
                    "regex": {"tags": {"ticket": r"\b[A-Z]{2,}-\d+\b"}},
                    "code": {}},
}


def _send(proxy: ProxyServer, upstream: Any, messages: list[dict[str, Any]]
          ) -> tuple[int, list[str], Any]:
    status, headers, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
        {"model": "gpt-test", "messages": messages}).encode())
    tags = sorted(t for t in headers.get("x-hookproxy-tags", "").split(",") if t)
    sent = [m.get("content") for m in upstream.last["messages"]] if status == 200 else None
    return status, tags, sent


def _fresh_and_memoized(proxy: ProxyServer, upstream: Any, messages: list[dict[str, Any]]
                        ) -> None:
    memo.clear()
    fresh = _send(proxy, upstream, messages)
    assert memo.misses and len(memo)
    hits = memo.hits
    again = _send(proxy, upstream, messages)
    assert memo.hits > hits  # the second time, what was known was not scanned again
    assert again == fresh


def test_memoized_results_equal_fresh_ones(upstream):
    with ProxyServer(upstream_config(upstream, **CONFIG)) as proxy:
        _fresh_and_memoized(proxy, upstream, CONVERSATION)
        status, tags, sent = _send(proxy, upstream, CONVERSATION)
        assert status == 200 and tags == ["billing", "code", "ticket"]
        assert "ann.lee" not in json.dumps(sent) and "[EMAIL_1]" in sent[2]
        assert "[PHONE_1]" in sent[5]

        # One message in the middle changes: its new text is scanned, the rest is known,
        # and the answers are those of a fresh scan.
        changed = copy.deepcopy(CONVERSATION)
        changed[2]["content"] = "No ticket; write to bob@example.org about the contract " + LONG
        _send(proxy, upstream, CONVERSATION)  # the memo holds the old conversation
        memoized = _send(proxy, upstream, changed)
        memo.clear()
        fresh = _send(proxy, upstream, changed)
        assert memoized == fresh
        assert fresh[1] == ["billing", "code", "legal"]
        assert "[EMAIL_1]" in fresh[2][2] and "bob@" not in json.dumps(fresh[2])

        # A guard verdict comes back the same from the memo as fresh.
        blocked = copy.deepcopy(CONVERSATION)
        blocked[3]["content"] = "Here is the FORBIDDEN phrase " + LONG
        for _ in range(2):
            assert _send(proxy, upstream, blocked)[0] == 400
        memo.clear()
        assert _send(proxy, upstream, blocked)[0] == 400


def test_memo_stays_within_its_bounds():
    small = Memo(max_bytes=100_000, max_entries=50)
    for i in range(1_000):
        text = f"{i:05d}" + "x" * 3_000
        assert small.get_or_compute("t", text, len) == len(text)
    assert len(small) <= 50 and small.bytes <= 100_000
    # Non-ASCII text counts at its worst case, four bytes a character.
    for i in range(100):
        small.get_or_compute("u", f"{i}" + "é" * 2_000, len)
    assert small.bytes <= 100_000
    # A text larger than the whole memo is computed, not kept.
    assert small.get_or_compute("big", "y" * 200_000, len) == 200_000
    assert ("big", "y" * 200_000) not in small._entries


def test_memo_bounds_come_from_config(upstream):
    config = upstream_config(upstream, server={"memo_bytes": 50_000, "memo_entries": 10},
                             classifiers={"code": {}})
    with ProxyServer(config) as proxy:
        assert (memo.max_bytes, memo.max_entries) == (50_000, 10)
        for i in range(40):
            _send(proxy, upstream, [{"role": "user", "content": f"{i} " + "word " * 400}])
        assert len(memo) <= 10 and memo.bytes <= 50_000
    memo_module.configure(64 * 1024 * 1024, 200_000)


def test_dashboard_buffer_and_records_stay_bounded(upstream, tmp_path):
    config = upstream_config(upstream, log={"path": str(tmp_path / "r.jsonl"),
                                            "bodies": "full", "max_record_bytes": 100_000},
                             dashboard={"held": 1000, "held_bytes": 1_000_000})
    with ProxyServer(config) as proxy:
        big = "x" * 1_000_000
        for i in range(30):
            status, _, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps({
                "model": "mock-1", "messages": [{"role": "user", "content": f"{i} {big}"}],
                "metadata": {"api_key": "sk-NESTEDSECRET", "deep": [{"auth_token": "T0KEN"}]},
            }).encode())
            assert status == 200
        feed = proxy.gateway.observer.feed
        assert wait_for(lambda: feed.last_id == 30)  # every record is out
        assert feed.bytes <= 1_000_000 + 100_000
        assert all(len(data) <= 100_000 for _, data in feed.entries)
        assert len(feed.entries) >= 5  # bounded, not emptied
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 30
    assert all(len(line) <= 100_000 for line in lines)
    text = "\n".join(lines)
    assert "NESTEDSECRET" not in text and "T0KEN" not in text
    record = json.loads(lines[-1])
    assert record["request"]["truncated_from_bytes"] > 1_000_000
    assert record["request"]["extra"]["metadata"]["api_key"] == "[redacted]"


# mock-1 is decoded whole (the mock is not an OpenAI provider); gpt-test goes to an OpenAI
# provider with nothing in between, so only its top-level fields are ever decoded on the
# request path, and the record's view is made from the body.
@pytest.mark.parametrize("model", ["mock-1", "gpt-test"])
def test_large_history_record_shows_first_and_newest_messages(upstream, tmp_path, model):
    config = upstream_config(upstream, log={"path": str(tmp_path / "r.jsonl")})
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                for i in range(99)]
    with ProxyServer(config) as proxy:
        status, _, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": model, "messages": messages, "metadata": {"api_key": "sk-SECRET"}}
        ).encode(), headers={"openai-organization": "org-1"})
        assert status == 200
    record = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    shown = [m["content"][0]["text"] for m in record["request"]["messages"]]
    assert shown == ["message 0"] + [f"message {i}" for i in range(93, 99)]
    assert record["request"]["messages_omitted"] == 92
    assert record["request"]["extra"]["metadata"]["api_key"] == "[redacted]"
    assert record["request"]["headers"] == {"openai-organization": "org-1"}


_TOOL = {"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}
_CLAUDE_TOOL = {"name": "read", "input_schema": {"type": "object"}}


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
@pytest.mark.parametrize("shape", ["short", "long", "system", "tools"])
def test_the_record_shows_an_undecoded_request_as_a_decoded_one(upstream, tmp_path, fmt,
                                                                 shape):
    """The record of a request that went to its provider undecoded (only its top-level
    fields read) shows what the record of the same request decoded whole shows (the mock's
    requests are decoded whole): with and without a system prompt or tools, whose body is
    read again, and with a history long enough to be cut."""
    config = upstream_config(upstream, log={"path": str(tmp_path / "r.jsonl")})
    turns = 3 if shape != "long" else 20
    messages: list[dict[str, Any]] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
        for i in range(turns)]
    body: dict[str, Any] = {"messages": messages, "max_tokens": 50, "temperature": 0.5,
                            "metadata": {"user_id": "u-1"}}
    if shape == "system":
        if fmt == "openai":
            messages.insert(0, {"role": "system", "content": "Be brief."})
        else:
            body["system"] = [{"type": "text", "text": "Be brief."}]
    if shape == "tools":
        body["tools"] = [_TOOL if fmt == "openai" else _CLAUDE_TOOL]
    path = "/v1/chat/completions" if fmt == "openai" else "/v1/messages"
    headers = {"anthropic-version": "2023-06-01"} if fmt == "anthropic" else {}
    with ProxyServer(config) as proxy:
        for model in ("mock-1", "gpt-test" if fmt == "openai" else "claude-test"):
            status, _, _ = post_raw(f"{proxy.url}{path}", json.dumps(
                {**body, "model": model}).encode(), headers=headers)
            assert status == 200
    decoded, undecoded = [json.loads(line)["request"]
                          for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert decoded.pop("model") == "mock-1"
    undecoded.pop("model")
    assert undecoded == decoded
    assert undecoded.get("messages_omitted", 0) == (13 if shape == "long" else 0)
    assert ("tools" in undecoded) == (shape == "tools")


def test_a_record_shows_what_it_can_of_a_request_no_decoder_reads(upstream, tmp_path):
    """A bare request whose messages the decoder refuses still leaves a record with both
    bodies, each made on its own: gone as it came to a provider of its format, the request
    is shown as sent (its history cut as any other's) with why it was not decoded; refused
    where it had to be decoded (another format), the 400 names no provider, since none was
    called. Neither logs a failure."""
    import openai
    import structlog

    config = upstream_config(upstream, log={"path": str(tmp_path / "r.jsonl")})
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
               for i in range(19)]
    # tool_calls must be a list: the decoder refuses this one; the provider reads it.
    odd = {"role": "user", "content": "the last one", "tool_calls": "none"}
    with ProxyServer(config) as proxy, structlog.testing.capture_logs() as logged:
        client = proxy.openai()
        answer = client.chat.completions.create(model="gpt-test", messages=[*history, odd])
        assert answer.choices[0].message.content == "echo: the last one"
        with pytest.raises(openai.BadRequestError, match="tool_calls") as refused:
            client.chat.completions.create(model="claude-test", messages=[*history, odd])
        proxy.settled(None)
    headers = refused.value.response.headers
    assert "x-hookproxy-provider" not in headers and "x-hookproxy-model" not in headers
    passed, failed = [json.loads(line) for line in
                      (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (passed["status"], failed["status"]) == (200, 400)
    assert "provider" not in failed and not failed.get("attempts")
    for record in (passed, failed):
        request = record["request"]
        assert request["messages"] == [history[0], *history[-5:], odd]
        assert request["messages_omitted"] == 13
        assert "tool_calls" in request["not_decoded"]
    assert passed["response"]["content"] == [{"type": "text", "text": "echo: the last one"}]
    assert not [event for event in logged if "failed" in event["event"]]


def test_undecoded_messages_still_count_against_the_limit_and_are_read_when_needed(upstream):
    """A bare same-format request is not decoded past its top-level fields, but the message
    limit holds, and a target that needs the request re-encoded reads all of it."""
    config = upstream_config(upstream, server={"max_messages": 5}, models=[
        {"name": "gpt-test", "provider": "oai"},
        {"name": "renamed", "provider": "oai", "model": "gpt-test"},
        {"name": "claude-test", "provider": "ant"}])
    too_many = [{"role": "user", "content": str(i)} for i in range(6)]
    odd = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
           {"role": "user", "content": [{"type": "made_up_part", "x": 1}]}]
    with ProxyServer(config) as proxy:
        status, _, body = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "gpt-test", "messages": too_many}).encode())
        assert status == 400 and body["error"]["code"] == "too_many_messages"
        # Same model, same format: the unknown part goes as it came.
        status, _, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "gpt-test", "messages": odd}).encode())
        assert status == 200
        assert upstream.last["messages"] == odd
        # Renamed: re-encoded from the decoded request, the unknown part kept.
        status, _, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "renamed", "messages": odd}).encode())
        assert status == 200
        assert upstream.last["model"] == "gpt-test"
        assert upstream.last["messages"] == odd
        # Another format: decoded, and what has no counterpart is named.
        status, _, body = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "claude-test", "messages": odd}).encode())
        assert status == 400 and "made_up_part" in body["error"]["message"]


def test_metrics_series_do_not_grow_with_made_up_names(upstream):
    with ProxyServer(upstream_config(upstream)) as proxy:
        for i in range(300):
            post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
                {"model": f"made-up-{i}", "messages": [{"role": "user", "content": "x"}]}
            ).encode())
            post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
                {"model": f"mock/{i}-direct", "messages": [{"role": "user", "content": "x"}]}
            ).encode())
        post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "mock-1", "messages": [{"role": "user", "content": "x"}]}).encode())

        def scrape() -> str:
            with urllib.request.urlopen(f"{proxy.url}/metrics") as response:
                text: str = response.read().decode()
            return text if 'model="mock-1"' in text else ""

        text = wait_for(scrape)
    series = [line for line in text.splitlines() if line.startswith("hookproxy_requests_total")]
    assert 'model="mock-1"' in text
    assert "made-up" not in text and "-direct" not in text, [
        line for line in text.splitlines() if "made-up" in line]
    assert len(series) <= 4, series


@pytest.mark.parametrize("words", [6_000])
def test_request_keyword_table_is_bounded_by_the_settings_cap(upstream, words):
    classifiers = {"keyword": {"client_settings": ["tags"]}}
    with ProxyServer(upstream_config(upstream, classifiers=classifiers)) as proxy:
        allowed = {"classifiers": {"keyword": {"tags": {"t": [f"w{i}" for i in range(words)]}}}}
        status, headers, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "mock-1", "messages": [{"role": "user", "content": "say w5999"}],
             "hookproxy": allowed}).encode())
        assert status == 200 and headers["x-hookproxy-tags"] == "t"
        too_big = {"classifiers": {"keyword": {"tags": {"t": [f"word{i}" for i in
                                                              range(20_000)]}}}}
        status, _, body = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps(
            {"model": "mock-1", "messages": [{"role": "user", "content": "x"}],
             "hookproxy": too_big}).encode())
        assert status == 400 and "`hookproxy`" in body["error"]["message"]


class _SlowSyncClassifier:
    """Another package's classifier that is slow by nature and not async."""

    @hookimpl
    def classify(self, ctx: Any, settings: dict[str, Any]) -> list[str]:
        time.sleep(3)
        return ["slow"]


def test_a_slow_sync_classifier_from_another_package_does_not_hold_the_loop(upstream):
    host = PluginHost()
    host.discover()
    host.add(_SlowSyncClassifier(), "slow_sync", kind="classifier")
    config = upstream_config(upstream, classifiers={"slow_sync": {}},
                             server={"classifier_timeout": 5.0})
    with ProxyServer(config, host=host) as proxy:
        done: list[tuple[int, dict[str, str]]] = []
        body = json.dumps({"model": "mock-1",
                           "messages": [{"role": "user", "content": "x"}]}).encode()
        slow = threading.Thread(target=lambda: done.append(
            post_raw(f"{proxy.url}/v1/chat/completions", body)[:2]))
        slow.start()
        time.sleep(0.3)
        started = time.perf_counter()
        with urllib.request.urlopen(f"{proxy.url}/health", timeout=30) as response:
            assert response.status == 200
        assert time.perf_counter() - started < 1.0  # generous; the classifier sleeps 3 s
        slow.join(30)
        status, headers = done[0]
        assert status == 200 and headers["x-hookproxy-tags"] == "slow"


def test_secret_keys_of_any_spelling_stay_out_of_small_records(upstream, tmp_path):
    config = upstream_config(upstream, log={"path": str(tmp_path / "r.jsonl"),
                                            "bodies": "full"})
    with ProxyServer(config) as proxy:
        status, _, _ = post_raw(f"{proxy.url}/v1/chat/completions", json.dumps({
            "model": "mock-1", "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"pass_word": "hunter1", "api_key\n": "hunter2",
                         "x" * 100 + "_token_" + "y" * 100: "hunter3",
                         "deep": [{"clientSecret": "hunter4"}]},
            "max_tokens": 5}).encode())
        assert status == 200
    text = (tmp_path / "r.jsonl").read_text()
    assert "hunter" not in text
    assert '"max_tokens":5' in text  # counts are not secrets


def test_redaction_stays_linear_on_back_to_back_numbers():
    from plugins.redact import _finder

    find = _finder(("secret", "email", "phone"))
    started = time.perf_counter()
    found = find("1234567890-" * 20_000)
    # 220 KB: one linear pass per kind. (The single alternation took minutes for 1 MB.)
    assert len(found) == 20_000 and all(kind == "phone" for _, _, kind in found)
    assert time.perf_counter() - started < 5


def test_redaction_over_many_parts_stays_linear():
    """A message of 70,000 parts: a key cut into one-character parts and 20,000 short ones
    that each hold an address. Each part is visited once, each value once per part."""
    from plugins.redact import _Masker
    from proxy.canonical import TextPart

    key = "sk-" + "a" * 50_000
    parts = [TextPart(text=c) for c in [*key, " "]]
    parts += [TextPart(text="x@y.io ") for _ in range(20_000)]
    masker = _Masker(["email", "phone", "secret"])
    started = time.perf_counter()
    masker.mask_parts(parts)
    assert {p.text for p in parts[:len(key)]} == {"[SECRET_1]"}
    assert {p.text for p in parts[len(key) + 1:]} == {"[EMAIL_1] "}
    assert masker.originals == {"[SECRET_1]": key, "[EMAIL_1]": "x@y.io"}
    assert time.perf_counter() - started < 5


class Fails:
    """Raises in the hook it is given."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def request_start(self) -> None:
        if self.hook == "request_start":
            raise ValueError("no")

    @hookimpl
    def post_response(self) -> None:
        if self.hook == "post_response":
            raise ValueError("no")


@pytest.mark.parametrize("model,failing,stream", [
    ("oai/m-status-500", None, False), ("no-such-model", None, False),
    ("gpt-test", None, False), ("gpt-test", None, True),
    ("gpt-test", "request_start", False), ("gpt-test", "request_start", True),
    ("gpt-test", "post_response", False)])
def test_a_finished_request_leaves_no_cycle_holding_it(upstream, model, failing, stream):
    # The process collects cycles rarely (proxy.cli sets a high threshold), so what a
    # request leaves in a reference cycle stays in memory long after it: a failed
    # request's exception held its traceback, whose frames held the whole request; the
    # connection's request cycle held its own send (and with it the request's scope).
    host = PluginHost()
    host.discover()
    plugins: dict[str, Any] = {"redact": {}}
    if failing:
        host.add(Fails(failing), "fails")
        plugins["fails"] = {}
    config = upstream_config(upstream, plugins=plugins, routing={"retries": 1})
    body = json.dumps({"model": model, "messages": CONVERSATION, "stream": stream}).encode()
    with ProxyServer(config, host=host) as proxy:
        _post_status(f"{proxy.url}/v1/chat/completions", body)
        proxy.settled(None)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                status = _post_status(f"{proxy.url}/v1/chat/completions", body)
                assert (status == 200) == (model == "gpt-test" and failing != "request_start")
            proxy.settled(None)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage
                    if isinstance(o, Message | RequestContext | Request | RequestResponseCycle
                                  | ClientGone)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []


def test_pipelined_requests_leave_no_cycle(upstream):
    """Requests sent one after another on a kept-alive connection, in one write (HTTP
    pipelining): each answered, none of their request cycles left in a reference cycle."""
    body = json.dumps({"model": "gpt-test", "messages": CONVERSATION}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))
    with ProxyServer(upstream_config(upstream)) as proxy:
        _post_status(f"{proxy.url}/v1/chat/completions", body)
        proxy.settled(None)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(request * 3)
                received = b""
                while received.count(b"HTTP/1.1 200") < 3 or not received.endswith(b"}"):
                    chunk = sock.recv(65536)
                    assert chunk, received
                    received += chunk
            proxy.settled(None)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage
                    if isinstance(o, RequestContext | RequestResponseCycle | ClientGone)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []


def _post_status(url: str, body: bytes) -> int:
    """POSTs ``body`` and reads the answer whole, JSON or a stream; its status."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return error.code
