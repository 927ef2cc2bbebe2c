"""``hookproxy serve --workers N`` as users run it: real worker processes on one port,
sharing a real redis-server. Limits hold across them exactly; the dashboard, /metrics and
``hookproxy tail`` see every worker's traffic; a cooldown one learns the others honour;
reload reaches all, a crashed worker is replaced, SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis

from proxy.config import load_config
from proxy.workers import worker_count
from tests.harness import wait_for
from tests.test_cli import HOKPROXY_ENV_ROOT, _free_port
from tests.test_limits import (
    KEYS,
    MAX_TOKENS,
    PRICE,
    PROMPT,
    RESERVED,
    RESERVED_COST,
    clear_of_the_minute,
)
from tests.test_observability import SSE

BUDGET = round(50 * RESERVED_COST, 6)


def _config(upstream: Any, redis_url: str | None, prefix: str, **extra: str) -> str:
    store = (f'[store]\nurl = "{redis_url}"\nprefix = "{prefix}"\ntimeout = 5.0\n'
             if redis_url else "")
    return f"""
[providers.oai]
type = "openai"
base_url = "{upstream.openai_url}"
[providers.mock]
type = "mock"
[[models]]
name = "gpt-test"
provider = "oai"
[[models]]
name = "priced"
provider = "oai"
model = "priced-model"
input_price = {PRICE}
output_price = {PRICE}
[[models]]
name = "slow-priced"
provider = "oai"
model = "priced-delay-1500"
input_price = {PRICE}
output_price = {PRICE}
[[models]]
name = "flaky"
strategy = "fallback"
targets = [{{ provider = "oai", model = "workers-status-503" }},
           {{ provider = "mock", model = "mock-1" }}]
[routing]
retries = 0
cooldown_failures = 2
cooldown = 120
[log]
path = "logs/requests.jsonl"
{store}
[auth]
admin_key_env = "HP_ADMIN_KEY"
[auth.keys.team-a]
key_env = "TEAM_A_KEY"
{extra.get("team_a", "")}
[auth.keys.team-b]
key_env = "TEAM_B_KEY"
"""


class Workers:
    def __init__(self, folder: Path, config: str, workers: int | None) -> None:
        """``workers``: passed as ``--workers``; None: the config's ``[server].workers``
        (then 2)."""
        self.folder, self.workers = folder, workers or 2
        self.config = folder / "config.toml"
        self.config.write_text(config)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **KEYS, "PYTHONPATH": str(HOKPROXY_ENV_ROOT)}
        self.output = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config),
             "--port", str(self.port),
             *(["--workers", str(workers)] if workers is not None else [])],
            cwd=folder, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Until every worker has started (each opens its log file as it does)."""
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.communicate()[0])
            return len(self.logs()) == self.workers
        assert wait_for(ready, timeout=60)

    def logs(self) -> list[Path]:
        return sorted((self.folder / "logs").glob("requests-*.jsonl"))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for log in self.logs()
                for line in log.read_text().splitlines()]

    def worker_pids(self) -> list[int]:
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def client(self, key: str = "TEAM_B_KEY") -> openai.OpenAI:
        # A new connection per request: each may land on any worker.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[key], max_retries=0,
                             default_headers={"connection": "close"})

    def admin_get(self, path: str) -> str:
        request = urllib.request.Request(self.url + path, headers={
            "authorization": f"Bearer {KEYS['HP_ADMIN_KEY']}", "connection": "close"})
        return urllib.request.urlopen(request, timeout=10).read().decode()

    def every_worker_serves(self) -> None:
        """Requests on fresh connections until each worker has logged one."""
        def spread() -> bool:
            self.client().chat.completions.create(model="gpt-test", messages=PROMPT)
            return all(log.stat().st_size for log in self.logs())
        assert wait_for(spread, timeout=60)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.output = self.process.communicate(timeout=60)[0]
        return self.output


@contextmanager
def workers(tmp_path: Path, config: str, count: int) -> Iterator[Workers]:
    served = Workers(tmp_path, config, count)
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def _concurrently(url: str, count: int) -> list[int]:
    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEYS["TEAM_A_KEY"],
                                      max_retries=0, timeout=60) as client:
            async def one() -> int:
                try:
                    await client.chat.completions.create(model="priced", messages=PROMPT,
                                                         max_tokens=MAX_TOKENS)
                except openai.APIStatusError as exc:
                    return exc.status_code
                return 200

            return list(await asyncio.gather(*(one() for _ in range(count))))

    return asyncio.run(run())


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _feed(url: str, count: int, last_id: int | None = None
                ) -> list[tuple[int, dict[str, Any]]]:
    headers = {"authorization": f"Bearer {KEYS['HP_ADMIN_KEY']}"}
    if last_id is not None:
        headers["last-event-id"] = str(last_id)
    async with aiohttp.ClientSession() as session, session.get(
            f"{url}/dashboard/events", headers=headers) as response:
        feed = SSE(response)
        return [await feed.next(timeout=20) for _ in range(count)]


def test_four_workers_hold_the_limits_and_show_all_traffic(upstream, tmp_path, redis_server,
                                                           monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    config = _config(upstream, redis_server.url, redis_server.prefix(),
                     team_a=f"rpm = 50\ntpm = {50 * RESERVED}\ndaily_budget = {BUDGET}")
    with workers(tmp_path, config, 4) as served:
        served.every_worker_serves()
        clear_of_the_minute()
        statuses = _concurrently(served.url, 200)
        assert sorted(statuses) == [200] * 50 + [429] * 150
        records = wait_for(lambda: [r for r in served.records() if r.get("caller") == "team-a"]
                           if sum(r.get("caller") == "team-a" for r in served.records()) == 200
                           else [])
        answered = [r for r in records if r["status"] == 200]
        assert len(answered) == 50
        spent = sum(r["cost"] for r in answered)
        assert spent == pytest.approx(sum(r["limits"]["cost"] for r in answered))
        # What the shared budget says is left is the budget less what was really spent.
        with pytest.raises(openai.RateLimitError) as caught:
            served.client("TEAM_A_KEY").chat.completions.create(
                model="priced", messages=PROMPT, max_tokens=MAX_TOKENS)
        left = float(caught.value.response.headers["x-ratelimit-remaining-budget-daily"])
        assert left == pytest.approx(BUDGET - spent, abs=1e-6)

        # /metrics, from whichever worker answers, counts every worker's requests.
        metrics = served.admin_get("/metrics")
        counted = _metric(metrics, "hookproxy_requests_total")
        everything = wait_for(lambda: served.records()
                              if len(served.records()) == counted else [])
        assert len(everything) == counted
        assert _metric(metrics, "hookproxy_requests_total", model="priced", status="200") == 50
        assert _metric(metrics, "hookproxy_requests_total", model="priced") == \
            sum(1 for r in everything if r["model"] == "priced")

        # The dashboard replays every worker's records, and resumes on any worker.
        ids_by_log = {log.name: {json.loads(x)["id"] for x in log.read_text().splitlines()}
                      for log in served.logs()}
        replay = asyncio.run(_feed(served.url, len(everything)))
        shown = {event["id"] for _, event in replay}
        assert all(ids <= shown for ids in ids_by_log.values()), "a worker's records missing"
        position = len(replay) // 2
        resumed = asyncio.run(_feed(served.url, 3, last_id=replay[position][0]))
        assert [event["id"] for _, event in resumed] == \
            [event["id"] for _, event in replay[position + 1:position + 4]]

        # `hookproxy tail` follows every worker's log.
        tail = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "tail", "--no-follow", "-n", "1000",
             "--config", str(served.config), "--color", "never"], capture_output=True,
            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(HOKPROXY_ENV_ROOT)})
        assert tail.returncode == 0, tail.stderr
        assert len(tail.stdout.splitlines()) == len(everything)
    assert served.process.returncode == 0


def test_workers_share_cooldowns_reload_together_and_replace_the_fallen(
        upstream, tmp_path, redis_server, monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    with workers(tmp_path, _config(upstream, redis_server.url, redis_server.prefix()),
                 2) as served:
        served.every_worker_serves()
        # Two failures anywhere cool the target down for every worker.
        client = served.client()
        assert wait_for(lambda: client.chat.completions.create(
            model="flaky", messages=PROMPT) and upstream.count("workers-status-503") >= 2)

        def nobody_calls_it() -> bool:
            before = upstream.count("workers-status-503")
            for _ in range(10):
                answer = client.chat.completions.with_raw_response.create(
                    model="flaky", messages=PROMPT)
                assert answer.headers["x-hookproxy-provider"] == "mock"
            return upstream.count("workers-status-503") == before

        assert wait_for(nobody_calls_it, timeout=30)

        # `hookproxy reload` reaches one worker; every worker reloads.
        served.config.write_text(served.config.read_text().replace(
            '[[models]]\nname = "gpt-test"',
            '[[models]]\nname = "added"\nprovider = "mock"\nmodel = "mock-1"\n'
            '[[models]]\nname = "gpt-test"'))
        reload = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "reload", "--config", str(served.config),
             "--url", served.url], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(HOKPROXY_ENV_ROOT)})
        assert reload.returncode == 0, reload.stderr

        def everyone_knows() -> bool:
            return all(any(m.id == "added" for m in served.client().models.list().data)
                       for _ in range(10))

        assert wait_for(everyone_knows, timeout=30)

        # A worker that dies is replaced; the others never stop serving.
        fallen = served.worker_pids()[0]
        os.kill(fallen, signal.SIGKILL)
        for _ in range(10):
            assert served.client().chat.completions.create(model="added", messages=PROMPT)
        assert wait_for(lambda: len(served.worker_pids()) == 2
                        and fallen not in served.worker_pids(), timeout=30)
        assert wait_for(everyone_knows, timeout=30)
    output = served.output
    assert served.process.returncode == 0, output
    assert re.search(r"worker died; replacing it.*exit_code=-9", output)
    # Each worker's lines in the app log name it: both reloaded, each said so.
    reloaded = [line for line in output.splitlines() if "config reloaded" in line]
    assert {re.search(r"\bworker=(\d)", line).group(1) for line in reloaded} == {"1", "2"}
    assert all(re.search(r"\bpid=\d+", line) for line in reloaded)
    assert not re.search(r"workers started.*\bworker=", output)  # the supervisor's own


def test_sigterm_drains_every_worker_and_settles_every_request(upstream, tmp_path,
                                                               redis_server, monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    prefix = redis_server.prefix()
    config = _config(upstream, redis_server.url, prefix, team_a="daily_budget = 100.0")
    served = Workers(tmp_path, config, 2)
    try:
        served.wait_ready()
        client = served.client("TEAM_A_KEY")
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(client.chat.completions.create, model="slow-priced",
                                   messages=PROMPT, max_tokens=MAX_TOKENS)
                       for _ in range(6)]
            assert wait_for(lambda: upstream.count("priced-delay-1500") == 6)
            # Every request is in flight (each settles only once answered): stop now.
            served.process.send_signal(signal.SIGTERM)
            assert all(answer.result().choices for answer in answers)
    finally:
        served.stop()
    assert served.process.returncode == 0, served.output
    answered = [r for r in served.records() if r["model"] == "slow-priced"]
    assert len(answered) == 6 and all(r["status"] == 200 for r in answered)
    # What Redis holds for the key's day is what the six cost, and nothing is left held.
    plain = redis.Redis(port=redis_server.port)
    spent = sum(int(plain.get(key) or 0) for key in plain.scan_iter(f"{prefix}auth:team-a:day:*")
                if not key.endswith(b":held"))
    held = sum(int(plain.get(key) or 0) for key in plain.scan_iter(f"{prefix}auth:team-a:*:held"))
    assert spent == round(sum(r["limits"]["cost"] for r in answered) * 1e6) > 0
    assert held == 0


def test_server_workers_in_the_config_and_auto(upstream, tmp_path, redis_server,
                                               monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    config = _config(upstream, redis_server.url, redis_server.prefix())
    # No --workers: [server].workers says how many.
    served = Workers(tmp_path, "[server]\nworkers = 2\n" + config, None)
    try:
        served.wait_ready()
        assert len(served.worker_pids()) == 2
    finally:
        served.stop()
    assert served.process.returncode == 0, served.output
    assert worker_count(load_config(str(served.config)), "auto") == \
        len(os.sched_getaffinity(0))


def test_workers_refuse_to_start_when_limits_would_not_be_shared(upstream, tmp_path):
    config = _config(upstream, None, "", team_a="rpm = 10")
    served = Workers(tmp_path, config, 2)
    output = served.process.communicate(timeout=60)[0]
    assert served.process.returncode == 2
    assert "2 workers need [store] url" in output and "the limits of key 'team-a'" in output
