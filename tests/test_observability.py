"""The JSONL request log, the live SSE feed, /metrics and `hookproxy tail`."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from proxy.logwriter import LogWriter
from tests.harness import ProxyServer, post_raw, upstream_config

HI = [{"role": "user", "content": "hello"}]


def _config(upstream: Any, tmp_path: Path, **log: Any) -> dict[str, Any]:
    config = upstream_config(upstream)
    config["log"] = {"path": str(tmp_path / "requests.jsonl"), **log}
    config["models"].append({"name": "priced", "provider": "oai", "model": "priced-model",
                             "input_price": 2.0, "output_price": 8.0})
    return config


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _drain(raw: Any) -> None:
    stream = raw.parse()
    if inspect.isawaitable(stream):  # the SDKs differ here
        stream = await stream
    async for _ in stream:
        pass


def test_every_request_leaves_exactly_one_line_under_load(upstream, tmp_path):
    """2,000 requests at 50 concurrent, mixed formats, streaming and not."""
    sent: dict[str, dict[str, Any]] = {}

    async def one(i: int, oai: Any, ant: Any, gate: asyncio.Semaphore) -> None:
        stream = i % 2 == 0
        text = f"request {i}"
        async with gate:
            if i % 3 == 0:
                raw = await ant.messages.with_raw_response.create(
                    model="mock-1", max_tokens=50, stream=stream,
                    messages=[{"role": "user", "content": text}])
                if stream:
                    await _drain(raw)
            else:
                raw = await oai.chat.completions.with_raw_response.create(
                    model="mock-1", stream=stream, messages=[{"role": "user", "content": text}])
                if stream:
                    await _drain(raw)
            sent[raw.headers["x-request-id"]] = {"stream": stream, "text": text,
                                                 "format": "anthropic" if i % 3 == 0
                                                 else "openai"}

    async def load(url: str) -> None:
        gate = asyncio.Semaphore(50)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as oai, \
                anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as ant:
            await asyncio.gather(*(one(i, oai, ant, gate) for i in range(2000)))

    path = tmp_path / "requests.jsonl"
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        asyncio.run(load(proxy.url))
    # The server has shut down: everything must be on disk now.
    records = _records(path)
    ids = [r["id"] for r in records]
    assert len(ids) == 2000 and set(ids) == set(sent)
    for record in random.Random(1).sample(records, 50):
        expected = sent[record["id"]]
        assert record["status"] == 200 and record["model"] == "mock-1"
        assert record["provider"] == "mock" and record["provider_model"] == "mock-1"
        assert record.get("stream", False) is expected["stream"]  # defaults are left out
        assert record["format"] == expected["format"]
        assert record["input_tokens"] > 0 and record["output_tokens"] > 0
        assert record["attempts"][0]["status"] == 200
        assert record["duration_ms"] >= record["upstream_ms"] >= 0
        assert expected["text"] in json.dumps(record["request"])
        if expected["stream"]:
            assert record["chunks"] > 2 and record["ttft_ms"] is not None


def test_records_of_failures_short_circuits_and_bad_input(upstream, tmp_path):
    config = _config(upstream, tmp_path)
    config["plugins"] = {"content_guard": {"patterns": ["forbidden"]}, "cache": {}}
    with ProxyServer(config) as proxy:
        client = proxy.openai()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gpt-test", messages=[
                {"role": "user", "content": "forbidden"}])
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="oai/x-status-500", messages=HI)
        client.chat.completions.create(model="priced", messages=HI)
        client.chat.completions.create(model="priced", messages=HI)  # a cache hit
        status, _, _ = post_raw(proxy.url + "/v1/messages", b"{not json")
        assert status == 400
    guard, failed, priced, cached, bad = _records(tmp_path / "requests.jsonl")
    assert guard["status"] == 400 and guard["plugins"] == {"content_guard": "rejected"}
    assert guard["error"]["stage"] == "request_start"
    assert guard["error"]["plugin"] == "content_guard"
    assert failed["status"] == 502 and failed["error"]["stage"] == "upstream"
    assert failed["attempts"][0]["status"] == 500
    assert priced["cost"] == pytest.approx((11 * 2.0 + 7 * 8.0) / 1e6)
    assert "cache_hit" not in priced and cached["cache_hit"] is True
    assert cached["plugins"]["cache"] == "short_circuit" and cached.get("cost", 0) == 0
    assert bad["status"] == 400 and bad["format"] == "anthropic"
    assert "malformed" in bad["error"]["message"]


def test_secrets_never_reach_the_log(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path, bodies="full")) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-SECRETKEY123456789",
                               max_retries=0)
        client.chat.completions.create(model="gpt-test", messages=HI,
                                       extra_body={"api_key": "sk-ALSOSECRET99999999"})
    text = (tmp_path / "requests.jsonl").read_text()
    assert "SECRETKEY" not in text and "ALSOSECRET" not in text
    assert '"api_key":"[redacted]"' in text


@pytest.mark.parametrize(("bodies", "present", "absent"), [
    ("none", None, '"request"'),
    ("truncated", "more characters", "x" * 200),
    ("full", "x" * 500, "more characters"),
])
def test_bodies_setting(upstream, tmp_path, bodies, present, absent):
    with ProxyServer(_config(upstream, tmp_path, bodies=bodies, truncate_chars=100)) as proxy:
        proxy.openai().chat.completions.create(model="mock-1", messages=[
            {"role": "user", "content": "x" * 500}])
    text = (tmp_path / "requests.jsonl").read_text()
    assert absent not in text
    if present:
        assert present in text


def test_rotation_keeps_the_configured_number_of_files(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path, max_bytes=4000, keep=2,
                             bodies="none")) as proxy:
        client = proxy.openai()
        for _ in range(120):
            client.chat.completions.create(model="mock-1", messages=HI)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
    for name in names[1:]:
        size = (tmp_path / name).stat().st_size
        assert 4000 <= size < 4000 + 100 * 1024
        assert all(json.loads(line)["status"] == 200
                   for line in (tmp_path / name).read_text().splitlines())


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    writer = LogWriter(tmp_path / "x.jsonl", queue_size=2)
    # Not started: nothing drains the queue.
    assert writer.submit(b"1\n") and writer.submit(b"2\n")
    started = time.perf_counter()
    assert writer.submit(b"3\n") is False
    assert time.perf_counter() - started < 1
    assert writer.dropped == 1
    writer.start()
    writer.close()
    assert (tmp_path / "x.jsonl").read_bytes() == b"1\n2\n"


def test_metrics(upstream, tmp_path):
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        client = proxy.openai()
        for _ in range(3):
            client.chat.completions.create(model="priced", messages=HI)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="oai/x-status-503", messages=HI)
        import urllib.request

        proxy.settled(None)  # the metrics count records, which follow the answers
        text = urllib.request.urlopen(f"{proxy.url}/metrics").read().decode()
    assert 'hookproxy_requests_total{model="priced",provider="oai",status="200"} 3.0' in text
    assert 'hookproxy_tokens_total{direction="input",model="priced",provider="oai"} 33.0' in text
    assert 'hookproxy_upstream_errors_total{provider="oai",status="503"} 1.0' in text
    assert "hookproxy_request_duration_seconds_bucket" in text
    assert "hookproxy_log_entries_dropped_total 0.0" in text
    assert 'hookproxy_cost_total{model="priced",provider="oai"}' in text
    # Histograms: cumulative buckets ending in +Inf, the count, the sum and when the series
    # began; a series is there (at zero) for the streams this model has not had.
    series = 'model="priced",provider="oai"'
    assert f'hookproxy_request_duration_seconds_bucket{{le="+Inf",{series}}} 3.0' in text
    assert f"hookproxy_request_duration_seconds_count{{{series}}} 3.0" in text
    assert f"hookproxy_request_duration_seconds_sum{{{series}}} " in text
    assert f"hookproxy_request_duration_seconds_created{{{series}}} " in text
    buckets = [float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("hookproxy_request_duration_seconds_bucket{")
               and series in line]
    assert len(buckets) == 15 and buckets == sorted(buckets)
    assert f"hookproxy_time_to_first_chunk_seconds_count{{{series}}} 0.0" in text
    assert "hookproxy_overhead_seconds_count 4.0" in text


# --- the live feed ------------------------------------------------------------------------


class SSE:
    """A minimal SSE client over aiohttp that keeps ids and data."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        event_id, data = 0, ""
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not raw:
                raise EOFError("the feed ended")
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                return event_id, json.loads(data)


async def _subscribe(session: aiohttp.ClientSession, url: str, last_id: int | None = None
                     ) -> SSE:
    headers = {"last-event-id": str(last_id)} if last_id is not None else {}
    response = await session.get(f"{url}/dashboard/events", headers=headers)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return SSE(response)


async def _send(url: str, n: int, padding: int = 0) -> list[str]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client:
        ids = []
        for i in range(n):
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-1", messages=[{"role": "user", "content": f"n{i}" + "x" * padding}])
            ids.append(raw.headers["x-request-id"])
        return ids


def test_feed_replays_then_resumes_without_gaps_or_repeats(upstream, tmp_path):
    async def scenario(url: str) -> None:
        first = await _send(url, 5)
        async with aiohttp.ClientSession() as session:
            feed = await _subscribe(session, url)
            replayed = [await feed.next() for _ in range(5)]
            assert [r["id"] for _, r in replayed] == first
            live = await _send(url, 3)
            got = [await feed.next() for _ in range(3)]
            assert [r["id"] for _, r in got] == live
            last_seen = got[0][0]  # pretend the connection dropped after the first
            feed.response.close()
            missed = await _send(url, 2)
            again = await _subscribe(session, url, last_id=last_seen)
            resumed = [await again.next() for _ in range(4)]
            assert [r["id"] for _, r in resumed] == live[1:] + missed
            ids = [i for i, _ in replayed + got[:1] + resumed]
            assert ids == sorted(set(ids)) and ids == list(range(ids[0], ids[0] + len(ids)))

    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        asyncio.run(scenario(proxy.url))


def test_two_subscribers_and_a_stalled_one(upstream, tmp_path):
    async def scenario(url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        # The stalled one asks for the feed and never reads a byte.
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with aiohttp.ClientSession() as session:
            one = await _subscribe(session, url)
            two = await _subscribe(session, url)

            async def read_all(feed: SSE) -> list[str]:
                return [(await feed.next(timeout=30))[1]["id"] for _ in range(300)]

            readers = [asyncio.ensure_future(read_all(feed)) for feed in (one, two)]
            started = time.perf_counter()
            # Big records, so that the stalled reader's socket buffers fill up.
            sent = await _send(url, 300, padding=60_000)
            elapsed = time.perf_counter() - started
            for got in await asyncio.gather(*readers):
                assert got == sent
        writer.close()
        # The stalled subscriber has been let go; requests went on meanwhile.
        assert elapsed < 60

    config = _config(upstream, tmp_path, bodies="full")
    config["dashboard"] = {"subscriber_queue": 20}
    with ProxyServer(config) as proxy:
        asyncio.run(scenario(proxy.url))
        # Records reach the feed from the observer's thread, just after their answers.
        feed = proxy.gateway.observer.feed
        deadline = time.monotonic() + 10
        while feed.dropped_subscribers == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feed.dropped_subscribers == 1  # the stalled one


def test_idle_feed_gets_keep_alives(upstream, tmp_path):
    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            feed = await _subscribe(session, url)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 0.8
            lines = []
            while (left := deadline - loop.time()) > 0:
                try:
                    line = await asyncio.wait_for(feed.response.content.readline(), left)
                except TimeoutError:
                    break
                lines.append(line.decode())
            assert sum("keep-alive" in line for line in lines) >= 2
            assert not any(line.startswith("data:") for line in lines)

    config = _config(upstream, tmp_path)
    config["dashboard"] = {"keepalive": 0.2}
    with ProxyServer(config) as proxy:
        asyncio.run(scenario(proxy.url))


# --- hookproxy tail -----------------------------------------------------------------------


def test_tail_prints_filters_and_follows(upstream, tmp_path):
    path = tmp_path / "requests.jsonl"
    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        client = proxy.openai()
        client.chat.completions.create(model="gpt-test", messages=HI)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=HI)
        time.sleep(0.3)  # let the writer thread write
        command = [sys.executable, "-m", "proxy.cli", "tail", "--file", str(path)]
        shown = subprocess.run([*command, "--no-follow"], capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
        assert len(shown) == 2
        assert "200  gpt-test -> oai/gpt-test" in shown[0]
        assert "404  missing -> -" in shown[1] and "does not exist" in shown[1]
        errors = subprocess.run([*command, "--no-follow", "--status", "error"],
                                capture_output=True, text=True, timeout=30).stdout
        assert errors.count("\n") == 1 and "missing" in errors
        follower = subprocess.Popen([*command, "-n", "0", "--provider", "ant"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            # The follower starts at the end of the file once it is running, which on a
            # busy machine takes a while: requests go on until it shows one.
            deadline = time.monotonic() + 30
            readable: list[Any] = []
            while not readable and time.monotonic() < deadline:
                client.chat.completions.create(model="gpt-test", messages=HI)
                client.chat.completions.create(model="claude-test", messages=HI)
                readable = select.select([follower.stdout], [], [], 0.5)[0]
            assert readable, "tail showed nothing in 30 s"
            line = follower.stdout.readline()  # type: ignore[union-attr]
            assert "claude-test -> ant/claude-test" in line
        finally:
            follower.terminate()
            follower.wait(10)


def test_records_follow_a_burst_of_answers_promptly(upstream, tmp_path):
    """Observers run after each answer has gone out, and records keep the order requests
    finished; neither may hold records back (a wake-up lost between threads once held
    them for a minute)."""
    async def burst(url: str) -> list[str]:
        gate = asyncio.Semaphore(50)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k",
                                      max_retries=0) as client:
            async def one(i: int) -> str:
                async with gate:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="gpt-test", messages=[{"role": "user", "content": f"b{i}"}])
                    return str(raw.headers["x-request-id"])

            return await asyncio.gather(*(one(i) for i in range(400)))

    with ProxyServer(_config(upstream, tmp_path)) as proxy:
        ids = asyncio.run(burst(proxy.url))
        feed = proxy.gateway.observer.feed
        started = time.monotonic()
        while feed.last_id < 400 and time.monotonic() - started < 5:
            time.sleep(0.02)
        assert feed.last_id == 400, f"{feed.last_id} of 400 records after 5 s"
        assert {json.loads(data)["id"] for _, data in feed.entries} == set(ids)
