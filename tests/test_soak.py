"""A bounded soak on loopback: tens of thousands of requests, mixed formats, streaming and
not, with upstream faults and clients that leave. Afterwards the log holds every request
exactly once, no 500 came from the proxy itself, and connections and tasks are back where
they started. HOOKPROXY_SOAK sets the number of requests (default 20,000)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections import Counter
from typing import Any

import anthropic
import openai
import pytest

from tests.harness import ProxyServer, upstream_config

REQUESTS = int(os.environ.get("HOOKPROXY_SOAK", "20000"))


async def _drain(stream: Any, stop_after: int | None = None) -> int:
    if inspect.isawaitable(stream):
        stream = await stream
    seen = 0
    async for _ in stream:
        seen += 1
        if stop_after is not None and seen >= stop_after:
            await stream.close()  # the client leaves mid-stream
            break
    return seen


async def _one(i: int, oai: Any, ant: Any, outcomes: Counter[str], ids: set[str]) -> None:
    kind = i % 20
    say = [{"role": "user", "content": f"soak {i} " + "word " * (i % 7)}]
    try:
        if kind < 6:
            raw = await oai.chat.completions.with_raw_response.create(
                model=("gpt-test", "claude-test", "mock-1")[kind % 3], messages=say)
        elif kind < 10:
            raw = await ant.messages.with_raw_response.create(
                model=("claude-test", "gpt-test")[kind % 2], max_tokens=50, messages=say)
        elif kind < 12:
            raw = await oai.chat.completions.with_raw_response.create(
                model="claude-test", messages=say, stream=True)
            await _drain(raw.parse())
        elif kind < 14:
            raw = await ant.messages.with_raw_response.create(
                model="gpt-test", max_tokens=50, messages=say, stream=True)
            await _drain(raw.parse())
        elif kind == 14:
            raw = await oai.chat.completions.with_raw_response.create(
                model="oai/x-drip", messages=say, stream=True)
            await _drain(raw.parse(), stop_after=2)
            outcomes["left"] += 1
        elif kind == 15:
            raw = await oai.chat.completions.with_raw_response.create(
                model="oai/x-cut", messages=[{"role": "user", "content": "a b c d"}],
                stream=True)
            try:
                await _drain(raw.parse())
            except openai.APIError:
                outcomes["cut"] += 1
        elif kind == 16:
            raw = await oai.chat.completions.with_raw_response.create(
                model="oai/x-status-503", messages=say)
        elif kind == 17:
            raw = await ant.messages.with_raw_response.create(
                model="ant/x-status-429", max_tokens=5, messages=say)
        elif kind == 18:
            raw = await oai.chat.completions.with_raw_response.create(
                model="mock-1", messages=[{"role": 7, "content": "?"}])
        else:
            raw = await oai.chat.completions.with_raw_response.create(
                model="no-such-model", messages=say)
        ids.add(raw.headers["x-request-id"])
        outcomes[str(raw.status_code)] += 1
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        ids.add(exc.response.headers["x-request-id"])
        outcomes[str(exc.status_code)] += 1


async def _load(url: str, outcomes: Counter[str], ids: set[str]) -> None:
    gate = asyncio.Semaphore(50)

    async def bounded(i: int, oai: Any, ant: Any) -> None:
        async with gate:
            await _one(i, oai, ant, outcomes, ids)

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as oai, \
            anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as ant:
        await asyncio.gather(*(bounded(i, oai, ant) for i in range(REQUESTS)))


def _levels(proxy: ProxyServer) -> tuple[int, int, int]:
    """(tasks on the server's loop, client connections, open upstream connections)."""
    loop = proxy.gateway.observer.loop
    async def count() -> tuple[int, int, int]:
        connector = proxy.gateway.session().connector
        assert connector is not None
        upstream = sum(len(c) for c in connector._conns.values()) + len(connector._acquired)
        return (len(asyncio.all_tasks()), len(proxy.server.server_state.connections),
                upstream)
    return asyncio.run_coroutine_threadsafe(count(), loop).result(10)


# The clients that leave close their SDK stream mid-iteration; now and then httpx's own
# response generator is then finalized by the garbage collector, which pytest reports as an
# unraisable exception in the *client*. The server side is what the assertions check.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(600)  # about two minutes on 2 shared cores; the default 120 s is too tight
def test_soak(upstream, tmp_path):
    config = upstream_config(upstream)
    config["log"] = {"path": str(tmp_path / "requests.jsonl"), "bodies": "none"}
    outcomes: Counter[str] = Counter()
    ids: set[str] = set()
    with ProxyServer(config) as proxy:
        proxy.openai().chat.completions.create(model="gpt-test", messages=[
            {"role": "user", "content": "warm up"}])
        time.sleep(0.2)
        before = _levels(proxy)
        started = time.perf_counter()
        asyncio.run(_load(proxy.url, outcomes, ids))
        elapsed = time.perf_counter() - started
        deadline = time.monotonic() + 10
        while ((after := _levels(proxy))[0] > before[0] or after[1] > before[1]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"soak: {REQUESTS} requests in {elapsed:.1f}s, outcomes {dict(outcomes)}")
    assert after[0] <= before[0], f"tasks: {before} -> {after}"
    assert after[1] <= before[1], f"connections: {before} -> {after}"
    # Upstream keep-alive connections are pooled, not leaked: at most one per concurrent
    # request.
    assert after[2] <= 60, f"upstream connections: {after[2]}"
    assert "500" not in outcomes
    records = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    logged = Counter(r["id"] for r in records)
    assert len(records) == REQUESTS + 1 and max(logged.values()) == 1
    assert ids <= set(logged)
    statuses = Counter(r["status"] for r in records)
    per_kind = REQUESTS // 20
    assert statuses[499] == per_kind  # every client that left is recorded as such
    assert statuses[502] == 2 * per_kind  # upstream 503 and the cut streams
    assert statuses[429] == per_kind and statuses[404] == per_kind
    assert statuses[400] == per_kind
    assert not any(r["status"] == 500 for r in records)
    assert outcomes["cut"] == per_kind and outcomes["left"] == per_kind
