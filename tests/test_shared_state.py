"""Replicas sharing one real redis-server: limits hold across them exactly, what one learns
about a target the other honours, and Redis going away never turns into a 500."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog

from tests.harness import ProxyServer, wait_for
from tests.redis_server import RedisServer
from tests.test_limits import (
    KEYS,
    MAX_TOKENS,
    PROMPT,
    RESERVED,
    RESERVED_COST,
    clear_of_the_minute,
    limits_config,
    records,
)


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


@contextmanager
def replicas(count: int, config: dict[str, Any], tmp_path: Path
             ) -> Iterator[list[ProxyServer]]:
    """``count`` proxies with one config (and one Redis), each with a log of its own."""
    with ExitStack() as stack:
        proxies = []
        for n in range(count):
            own = {**config, "log": {"path": str(tmp_path / f"r{n}" / "requests.jsonl")}}
            proxies.append(stack.enter_context(ProxyServer(own)))
        yield proxies


def spread(proxies: list[ProxyServer], count: int, key: str = "TEAM_A_KEY",
           model: str = "priced") -> list[int]:
    """``count`` requests at once, dealt out over the proxies; their statuses."""
    async def run() -> list[int]:
        clients = [openai.AsyncOpenAI(base_url=f"{p.url}/v1", api_key=KEYS[key],
                                      max_retries=0, timeout=30) for p in proxies]

        async def one(n: int) -> int:
            try:
                await clients[n % len(clients)].chat.completions.create(
                    model=model, messages=PROMPT, max_tokens=MAX_TOKENS)
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

        try:
            return list(await asyncio.gather(*(one(n) for n in range(count))))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(run())


def test_limits_hold_exactly_across_replicas(upstream, tmp_path, redis_server):
    clear_of_the_minute()
    config = limits_config(upstream, tmp_path, rpm=50, tpm=50 * RESERVED,
                           daily_budget=round(50 * RESERVED_COST, 6))
    # Two replicas and 200 clients share one interpreter here: a generous timeout.
    config["store"] = {"url": redis_server.url, "prefix": redis_server.prefix(),
                       "timeout": 5.0}
    with replicas(2, config, tmp_path) as proxies:
        statuses = spread(proxies, 200)
        assert sorted(statuses) == [200] * 50 + [429] * 150
        # Each replica took half of them and counted them in the one Redis.
        found = [r for n in range(2) for r in records(tmp_path / f"r{n}", 100)]
        answered = [r for r in found if r["status"] == 200]
        assert len(answered) == 50 and all(r["limits"]["tokens"] == 18 for r in answered)
        spent = sum(r["cost"] for r in answered)
        headers = proxies[0].openai(api_key=KEYS["TEAM_B_KEY"])  # another key: unaffected
        assert headers.chat.completions.create(model="priced", messages=PROMPT,
                                               max_tokens=1).choices
    left = _budget_left(proxies[1], config, tmp_path)
    assert left == pytest.approx(round(50 * RESERVED_COST, 6) - spent, abs=1e-6)


def _budget_left(proxy: ProxyServer, config: dict[str, Any], tmp_path: Path) -> float:
    """What another proxy on the same Redis says is left of team-a's daily budget."""
    own = {**config, "log": {"path": str(tmp_path / "probe" / "requests.jsonl")}}
    own["auth"] = {**config["auth"], "keys": {
        **config["auth"]["keys"],
        "team-a": {**config["auth"]["keys"]["team-a"], "rpm": 0}}}
    with ProxyServer(own) as probe:
        answer = probe.openai(api_key=KEYS["TEAM_A_KEY"]).chat.completions\
            .with_raw_response.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    return float(answer.headers["x-ratelimit-remaining-budget-daily"])


def test_a_cooldown_one_replica_learns_is_honoured_by_the_other(upstream, tmp_path,
                                                                redis_server):
    config = limits_config(upstream, tmp_path)
    del config["auth"]
    config["models"].append({"name": "flaky", "strategy": "fallback", "targets": [
        {"provider": "oai", "model": "shared-status-503"},
        {"provider": "mock", "model": "mock-1"}]})
    config["routing"] = {"retries": 0, "cooldown_failures": 2, "cooldown": 60}
    config["store"] = {"url": redis_server.url, "prefix": redis_server.prefix()}
    with replicas(2, config, tmp_path) as (first, second):
        for _ in range(2):  # two failures, each answered by the fallback
            assert first.openai().chat.completions.create(model="flaky", messages=PROMPT)
        failed = upstream.count("shared-status-503")

        def second_skips_it() -> bool:
            before = upstream.count("shared-status-503")
            answer = second.openai().chat.completions.with_raw_response.create(
                model="flaky", messages=PROMPT)
            assert answer.headers["x-hookproxy-provider"] == "mock"
            return upstream.count("shared-status-503") == before

        # The second replica never failed there itself; it reads the cooldown.
        assert wait_for(second_skips_it)
        assert upstream.count("shared-status-503") <= failed + 2


def test_latencies_one_replica_measured_steer_the_other(upstream, tmp_path, redis_server):
    config = limits_config(upstream, tmp_path)
    del config["auth"]
    slow, fast = "steer-delay-400", "steer-fast"
    config["models"].append({"name": "quickest", "strategy": "least_latency", "targets": [
        {"provider": "oai", "model": fast}, {"provider": "oai", "model": slow}]})
    config["store"] = {"url": redis_server.url, "prefix": redis_server.prefix()}

    def ask(proxy: ProxyServer) -> str:
        answer = proxy.openai().chat.completions.with_raw_response.create(
            model="quickest", messages=PROMPT)
        return str(answer.headers["x-hookproxy-model"])

    with replicas(2, config, tmp_path) as (first, second):
        # The first replica measures both targets (one never measured goes first).
        assert {ask(first), ask(first)} == {fast, slow}
        # The second has measured neither: alone, after its first request (to the fast
        # one, first in the list) it would try the slow one it never measured. It reads
        # the first's latencies instead (as the first request made it refresh them).
        assert ask(second) == fast
        time.sleep(0.3)
        before = upstream.count(slow)
        assert [ask(second) for _ in range(4)] == [fast] * 4
        assert upstream.count(slow) == before


def _metrics(proxy: ProxyServer) -> str:
    request = urllib.request.Request(proxy.url + "/metrics", headers={
        "authorization": f"Bearer {KEYS['HP_ADMIN_KEY']}"})
    return urllib.request.urlopen(request).read().decode()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_stopped_and_restarted_mid_run(upstream, tmp_path, mode):
    server = RedisServer().start()
    config = limits_config(upstream, tmp_path, rpm=1000, daily_budget=10.0)
    config["plugins"] = {"cache": {}}
    config["store"] = {"url": server.url, "timeout": 0.2, "limits_on_error": mode}
    try:
        with ProxyServer(config) as proxy:
            limited = proxy.openai(api_key=KEYS["TEAM_A_KEY"])
            plain = proxy.openai(api_key=KEYS["TEAM_B_KEY"])  # no limits
            first = limited.chat.completions.with_raw_response.create(
                model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
            assert first.headers["x-ratelimit-remaining-requests"] == "999"
            with structlog.testing.capture_logs() as logged:
                server.stop()
                statuses = []
                for n in range(6):
                    for client in (limited, plain):
                        try:
                            client.chat.completions.create(
                                model="priced", max_tokens=MAX_TOKENS,
                                messages=[{"role": "user", "content": f"while down {n}"}])
                            statuses.append(200)
                        except openai.APIStatusError as exc:
                            statuses.append(exc.status_code)
                            assert exc.status_code == 503
                            assert "cannot be checked" in exc.message
                            assert exc.response.headers["retry-after"] == "1"
            # Never a 500: limits refused (closed) or let through (open); the cache is
            # skipped either way, so the key without limits is answered.
            assert statuses[1::2] == [200] * 6
            assert statuses[0::2] == ([503] * 6 if mode == "closed" else [200] * 6)
            assert any(e["event"] == "store_unreachable" for e in logged)
            assert 'hookproxy_store_errors_total{operation="reserve"}' in _metrics(proxy)
            server.start()

            def counted_again() -> bool:
                try:
                    answer = limited.chat.completions.with_raw_response.create(
                        model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
                except openai.APIStatusError:
                    return False
                return "x-ratelimit-remaining-requests" in answer.headers

            assert wait_for(counted_again)
            again = limited.chat.completions.with_raw_response.create(
                model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
            # A new, empty Redis: counting resumed there.
            assert int(again.headers["x-ratelimit-remaining-requests"]) >= 997
    finally:
        server.stop()
    if mode == "open":
        # The six sent while Redis was down (and those until it was back) say so.
        down = [r for r in records(tmp_path, 14) if r.get("caller") == "team-a" and
                "while down" in str(r.get("request"))]
        assert len(down) == 6 and all(r["limits"]["unchecked"] for r in down)
