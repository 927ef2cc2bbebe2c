"""One request never stalls the others: while a hostile request is being served, a
concurrent ``GET /health`` and a one-word chat completion still answer within a generous
bound. ``hookproxy serve`` runs as a subprocess, on the shipped config.toml plus redact,
content_guard and the keyword and regex classifiers."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.test_cli import ROOT, serve_in

# Generous on purpose: a stalled loop waited 5-17 s here before; speed itself is the
# benchmark's business.
BOUND = 1.0
# The operator lets requests bring their own patterns and keyword tables here (not the
# default): the worst a request can then do must still not stall anyone.
EXTRA = """
[plugins.redact]
[plugins.content_guard]
patterns = ["(?i)ignore (all )?previous instructions"]
client_settings = ["patterns"]
[classifiers.keyword]
client_settings = ["tags"]
[classifiers.keyword.tags]
billing = ["invoice", "refund", "credit card"]
[classifiers.regex]
client_settings = ["tags"]
[classifiers.regex.tags]
ticket = "\\\\b[A-Z]{2,}-\\\\d+\\\\b"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("responsive")
    shutil.copy(ROOT / "config.toml", workdir / "config.toml")
    with (workdir / "config.toml").open("a") as config:
        config.write(EXTRA)
    process, url = serve_in(workdir)
    yield url
    process.terminate()
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "Traceback" not in output, output


def _post(url: str, body: bytes, timeout: float = 120,
          path: str = "/v1/chat/completions") -> int:
    request = urllib.request.Request(f"{url}{path}", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return int(error.code)


def _chat(content: str, **extra: Any) -> bytes:
    return json.dumps({"model": "mock-1", "messages": [{"role": "user", "content": content}],
                       **extra}).encode()


def _while_busy(url: str, hostile: bytes, copies: int = 2, path: str = "/v1/chat/completions"
                ) -> tuple[list[int], float, float]:
    """Sends ``copies`` of the hostile request (to ``path``); once they are in flight, times
    a /health and a one-word completion. Returns the hostile statuses and the two waits."""
    statuses: list[int] = []
    senders = [threading.Thread(target=lambda: statuses.append(_post(url, hostile,
                                                                     path=path)))
               for _ in range(copies)]
    for sender in senders:
        sender.start()
    time.sleep(0.3)  # the hostile requests are being read and worked on
    started = time.perf_counter()
    urllib.request.urlopen(f"{url}/health", timeout=60).read()
    health = time.perf_counter() - started
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    started = time.perf_counter()
    reply = client.chat.completions.create(model="mock-1",
                                           messages=[{"role": "user", "content": "hi"}])
    chat = time.perf_counter() - started
    assert reply.choices[0].message.content
    for sender in senders:
        sender.join(120)
    return statuses, health, chat


HOSTILE = {
    # The code classifier's patterns were quadratic in line starts.
    "newlines": _chat("\n" * 30_000 + "x"),
    "many_lines": _chat("{\n" * 50_000),
    # redact's e-mail pattern backtracked over every position of a long local part.
    "email_run": _chat("a." * 50_000),
    "phone_run": _chat("1 " * 100_000),
    # Phone numbers back to back that an e-mail branch could keep scanning past.
    "phone_dashes": _chat("1234567890-" * 100_000),
    # The largest pattern and keyword inputs a request can still bring (64 KB of settings),
    # against a long text: a nested quantifier and 6,000 keywords.
    "client_pattern": _chat("a" * 1_000_000 + "!", hookproxy={"plugins": {"content_guard": {
        "patterns": ["(a+)+$", "(a|aa)+$", "(.*a){20}"]}}}),
    "client_keywords": _chat(" ".join(f"w{i}" for i in range(200_000)), hookproxy={
        "classifiers": {"keyword": {"tags": {"t": [f"word{i}" for i in range(6_000)]}}}}),
    "client_regex": _chat("ab" * 500_000, hookproxy={"classifiers": {"regex": {"tags": {
        f"t{i}": "(a*)*b" for i in range(500)}}}}),
    # 10 MB of short strings.
    "short_strings": _chat("hello", metadata={"items": ["ab"] * 1_700_000}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_does_not_stall_others(served, name):
    statuses, health, chat = _while_busy(served, HOSTILE[name])
    assert all(status < 500 for status in statuses), statuses
    assert health < BOUND, f"/health waited {health:.2f}s behind {name}"
    assert chat < BOUND, f"a one-word completion waited {chat:.2f}s behind {name}"


def test_hostile_requests_are_answered(served):
    # Each was served or refused cleanly: a client setting too large is a 400 naming it.
    big = _chat("x", hookproxy={"plugins": {"content_guard": {
        "patterns": ["a" * 70_000]}}})
    request = urllib.request.Request(f"{served}/v1/chat/completions", data=big, method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "at most 65,536" in json.loads(refused.value.read())["error"]["message"]
    assert _post(served, HOSTILE["email_run"]) == 200
    # "(.*a){20}" finds its twenty a's: the guard refuses, in linear time.
    assert _post(served, HOSTILE["client_pattern"]) == 400


def _embed(count: int, dimensions: int) -> bytes:
    return json.dumps({"model": "mock-1", "input": ["a"] * count,
                       "dimensions": dimensions}).encode()


def test_the_mock_embeddings_do_not_stall_others(served):
    # 5 KB asking the shipped mock for 1,000 vectors of 4,096 floats (38 MB) held the loop
    # 2-3 s: over the mock's cap, refused at once; at the cap, answered without a stall.
    # 262,144 one-letter inputs (1 MB) were each converted before the input count was
    # checked against max_messages, holding the loop over a second.
    for hostile, status in ((_embed(1000, 4096), 400), (_embed(64, 4096), 200),
                            (_embed(262_144, 1), 400)):
        statuses, health, chat = _while_busy(served, hostile, copies=3,
                                             path="/v1/embeddings")
        assert health < BOUND, f"/health waited {health:.2f}s behind embeddings"
        assert chat < BOUND, f"a one-word completion waited {chat:.2f}s behind embeddings"
        assert statuses == [status] * 3
