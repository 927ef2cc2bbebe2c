"""hookproxy's benchmark: hookproxy against the stack's floor (and LiteLLM, if installed),
all in front of one fast fake upstream, on loopback.

    python bench/run.py                 # the full run, a few minutes on 2 cores
    python bench/run.py --quick         # a short run, for a quick look

Load comes from wrk (Debian's package; hey for the fixed request counts of the memory
phase), the same for every contender, with the rounds
interleaved so that machine drift hits all of them alike. Streaming is measured by a small
asyncio client here (wrk cannot time chunks). Results go to bench/results/latest.json and,
with --write-docs, to docs/performance.md and docs/performance.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from payloads import anthropic_body, openai_body

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
BODY = json.dumps({
    "model": "bench-model",
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Say hello to the benchmark, please."}],
    "max_tokens": 64,
})

BARE = """
[server]
port = {port}
[log]
path = "{log}"
[providers.up]
type = "openai"
base_url = "{upstream}/v1"
[providers.up-anthropic]
type = "anthropic"
base_url = "{upstream}"
[[models]]
name = "bench-model"
provider = "up"
[[models]]
name = "bench-claude"
provider = "up-anthropic"
"""

REALISTIC = BARE + """
[[models]]
name = "bench-coder"
provider = "up"
[[models]]
name = "bench-billing"
provider = "up"
[[models]]
name = "bench-claude-coder"
provider = "up-anthropic"
[[routes]]
model = "bench-model"
tags_all = ["code", "tools"]
to = "bench-coder"
[[routes]]
model = "bench-model"
tags_any = ["billing"]
to = "bench-billing"
[[routes]]
model = "bench-claude"
tags_all = ["code", "tools"]
to = "bench-claude-coder"
[plugins.system_prompt]
text = "Answer briefly."
[plugins.param_limits]
max_tokens = 1024
temperature_max = 1.0
[plugins.redact]
[classifiers.code]
[classifiers.features]
[classifiers.language]
[classifiers.keyword.tags]
billing = ["invoice", "refund", "credit card", "chargeback"]
legal = ["contract", "GDPR", "subpoena"]
"""

LITELLM = """
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: {upstream}/v1
      api_key: bench
  - model_name: bench-claude
    litellm_params:
      model: anthropic/bench-claude
      api_base: {upstream}
      api_key: bench
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Contender:
    name: str
    url: str
    process: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=BODY.encode(),
                                     headers={"content-type": "application/json"})
    while True:
        try:
            urllib.request.urlopen(request, timeout=2).read()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{url}: the server exited") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: not ready after {timeout}s") from None
            time.sleep(0.2)


def start(name: str, command: list[str], port: int, **kwargs: Any) -> Contender:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               **kwargs)
    contender = Contender(name, f"http://127.0.0.1:{port}", process)
    try:
        wait_ready(contender.url, process)
    except RuntimeError:
        stop(contender)
        raise
    return contender


def stop(contender: Contender) -> None:
    if contender.process is not None and contender.process.poll() is None:
        contender.process.send_signal(signal.SIGTERM)
        try:
            contender.process.wait(15)
        except subprocess.TimeoutExpired:
            contender.process.kill()


# --- load ------------------------------------------------------------------------------

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
"""


@dataclass
class Payload:
    """One kind of request: the one-word prompt, or an agent's 200 KB turn."""

    name: str
    path: str
    body: str
    script: Path | None = None

    def write_script(self, directory: Path) -> None:
        self.script = directory / f"{self.name}.lua"
        self.script.write_text(LUA.format(body=self.body))


def payloads() -> list[Payload]:
    return [
        Payload("word", "/v1/chat/completions", BODY),
        Payload("agent-openai", "/v1/chat/completions", json.dumps(openai_body(1))),
        # Each format to a provider of its own format: cross-format is not this benchmark.
        Payload("agent-anthropic", "/v1/messages",
                json.dumps(anthropic_body(1, model="bench-claude"))),
    ]


def hey(url: str, requests: int, payload: Payload | None = None) -> None:
    """Exactly ``requests`` requests at 50 concurrent (wrk runs for a time, not a count)."""
    path, body = (payload.path, payload.body) if payload else ("/v1/chat/completions", BODY)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        file.write(body)
        file.flush()
        output = subprocess.run(["hey", "-n", str(requests), "-c", "50", "-m", "POST", "-T",
                                 "application/json", "-D", file.name, f"{url}{path}"],
                                capture_output=True, text=True, check=True).stdout
    if f"[200]\t{requests} responses" not in output:
        raise RuntimeError(f"{url}: not every request got a 200:\n{output}")


def _duration(text: str) -> float:
    """wrk's '312.00us' / '1.20ms' / '2.00s' in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, payload: Payload, *, connections: int, threads: int, seconds: float,
        latency: bool = False) -> dict[str, float]:
    assert payload.script is not None
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s",
               str(payload.script), f"{url}{payload.path}"]
    if latency:
        command.insert(1, "--latency")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
              "requests": float(re.search(r"(\d+) requests in", output).group(1))}  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    result["errors"] = float(bad.group(1)) if bad else 0.0
    result["timeouts"] = 0.0
    if errors:
        # wrk gives up on a request after 2 s: a timeout is a slow answer, not a failed one.
        connect, read, write, timeout = (float(x) for x in errors.groups())
        result["errors"] += connect + read + write
        result["timeouts"] = timeout
    if latency:
        for percentile in ("50", "99"):
            found = re.search(rf"^\s+{percentile}(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
            assert found, output
            result[f"p{percentile}"] = _duration(found.group(1))
    return result


def _failures(errors: float | None, timeouts: float | None) -> str:
    """What the report says beside a throughput: errors (non-2xx answers, socket errors)
    and wrk's 2 s timeouts, each if any."""
    said = [f"{n:.0f} {what}" for n, what in ((errors, "errors"), (timeouts, "timeouts"))
            if n]
    return f" ({', '.join(said)})" if said else ""


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    current = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return current / 1024, peak / 1024


async def _stream_once(session: aiohttp.ClientSession, url: str, chunks: int,
                       payload: Payload | None = None) -> tuple[float, float]:
    path, base = (payload.path, payload.body) if payload else ("/v1/chat/completions", BODY)
    body = json.dumps({**json.loads(base), "stream": True, "max_tokens": chunks})
    # A chunk of the answer, however the proxy spaces its JSON (LiteLLM puts a space in).
    word = re.compile(rb'"text"\s*:\s*"word' if path.endswith("/messages")
                      else rb'"content"\s*:\s*"word')
    started = time.perf_counter()
    first = last = 0.0
    seen = 0
    async with session.post(f"{url}{path}", data=body,
                            headers={"content-type": "application/json"}) as response:
        assert response.status == 200, await response.text()
        pending = b""
        async for data in response.content.iter_any():
            now = time.perf_counter()
            pending += data
            events = pending.split(b"\n\n")
            pending = events.pop()
            for event in events:
                if b"data: {" in event and word.search(event):
                    seen += 1
                    if seen == 1:
                        first = now
                    last = now
    assert seen == chunks, f"{url}: {seen} of {chunks} chunks"
    # Over the whole stream, request to last chunk: the spread between first and last
    # chunk alone depends on how the network happened to coalesce the burst.
    return (first - started) * 1000, seen / (last - started)


def stream_stats(url: str, requests: int, chunks: int = 200, payload: Payload | None = None
                 ) -> tuple[float, float]:
    """Median time to first chunk (ms) and chunks per second over sequential streams."""
    async def run() -> tuple[float, float]:
        async with aiohttp.ClientSession() as session:
            await _stream_once(session, url, chunks, payload)  # warm-up
            results = [await _stream_once(session, url, chunks, payload)
                       for _ in range(requests)]
        return (statistics.median(r[0] for r in results),
                statistics.median(r[1] for r in results))

    return asyncio.run(run())


def turn_latencies(url: str, conversations: int) -> tuple[float, float]:
    """Median latency (ms) of an agent's first turn, never seen before, and of its second
    turn (the same history plus one answer and one new message), sequentially, over
    ``conversations`` conversations that share no message."""
    async def run() -> tuple[float, float]:
        firsts, seconds = [], []
        headers = {"content-type": "application/json"}
        async with aiohttp.ClientSession() as session:
            for i in range(conversations + 1):
                times = []
                for turn in (1, 2):
                    body = json.dumps(openai_body(turn, salt=f"conversation {i} {os.getpid()}"))
                    started = time.perf_counter()
                    async with session.post(f"{url}/v1/chat/completions", data=body,
                                            headers=headers) as response:
                        await response.read()
                        assert response.status == 200, response.status
                    times.append((time.perf_counter() - started) * 1000)
                if i:  # the first conversation warms up
                    firsts.append(times[0])
                    seconds.append(times[1])
        return statistics.median(firsts), statistics.median(seconds)

    return asyncio.run(run())


# --- the run ---------------------------------------------------------------------------

PHASES = ("memory", "agent-memory", "throughput", "latency", "streaming", "turns")


def _key(payload: Payload, measure: str) -> str:
    """Result names: the one-word prompt keeps the plain ones (rps, p50, ...)."""
    return measure if payload.name == "word" else f"{payload.name}:{measure}"



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter rounds, fewer requests")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated subset to run (for quick looks while tuning)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write docs/performance.md and docs/performance.svg")
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "hey", "curl") if not shutil.which(tool)]
    if missing:
        print(f"bench: needs {', '.join(missing)}: apt-get install {' '.join(missing)}",
              file=sys.stderr)
        return 2
    rounds, seconds = (2, 3) if args.quick else (3, 8)
    memory_marks = (2_000, 10_000) if args.quick else (10_000, 100_000)
    agent_marks = (2_000, 10_000) if args.quick else (10_000, 100_000)
    stream_requests = 10 if args.quick else 30
    turn_requests = 10 if args.quick else 30

    workdir = Path(tempfile.mkdtemp(prefix="hookproxy-bench-"))
    upstream_port = free_port()
    upstream = start("upstream", [PYTHON, str(BENCH / "upstream.py"), "--port",
                                  str(upstream_port)], upstream_port)
    direct = Contender("direct", upstream.url, upstream.process)
    contenders: list[Contender] = []
    subscriber: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        contenders.append(start("floor", [PYTHON, str(BENCH / "floor.py"), "--port", str(port),
                                          "--upstream", upstream.url], port))
        for name, template in (("hookproxy-bare", BARE), ("hookproxy", REALISTIC)):
            port = free_port()
            config = workdir / f"{name}.toml"
            config.write_text(template.format(port=port, upstream=upstream.url,
                                              log=workdir / f"{name}.jsonl"))
            contenders.append(start(name, [PYTHON, "-m", "proxy.cli", "serve", "--config",
                                           str(config)], port, cwd=ROOT))
        realistic = contenders[-1]
        subscriber = subprocess.Popen(
            ["curl", "-sN", f"{realistic.url}/dashboard/events"], stdout=subprocess.DEVNULL)
        if shutil.which("litellm"):
            port = free_port()
            config = workdir / "litellm.yaml"
            config.write_text(LITELLM.format(upstream=upstream.url))
            contenders.append(start("litellm", ["litellm", "--config", str(config), "--port",
                                                str(port), "--num_workers", "1"], port))
        else:
            print("bench: LiteLLM is not installed (no `litellm` command); carrying on "
                  "without it", file=sys.stderr)

        kinds = payloads()
        for payload in kinds:
            payload.write_script(workdir)
        word, agents = kinds[0], kinds[1:]
        phases = set(args.phases.split(","))
        if "memory" in phases:
            print(f"memory: {memory_marks[0]:,} then {memory_marks[1]:,} requests each",
                  file=sys.stderr)
        for contender in contenders if "memory" in phases else ():
            served = 0
            for mark in memory_marks:
                hey(contender.url, mark - served)
                served = mark
                contender.results[f"rss_after_{mark}"] = rss_mb(contender.pid)[0]
        if "agent-memory" in phases:
            # The realistic pipeline, 200 KB agent turns in both formats, alternating.
            print(f"agent memory: {agent_marks[0]:,} then {agent_marks[1]:,} agent requests",
                  file=sys.stderr)
            served = 0
            for mark in agent_marks:
                half = (mark - served) // 2
                hey(realistic.url, half, agents[0])
                hey(realistic.url, mark - served - half, agents[1])
                served = mark
                realistic.results[f"agent_rss_after_{mark}"] = rss_mb(realistic.pid)[0]

        print(f"throughput: {rounds} rounds of {seconds}s at 50 connections", file=sys.stderr)
        for _ in range(rounds if "throughput" in phases else 0):
            for payload in kinds:
                for contender in contenders:
                    result = wrk(contender.url, payload, connections=50, threads=1,
                                 seconds=seconds)
                    contender.add(_key(payload, "rps"), result["rps"])
                    contender.add(_key(payload, "errors"), result["errors"])
                    contender.add(_key(payload, "timeouts"), result["timeouts"])

        print("sequential latency", file=sys.stderr)
        for _ in range(rounds if "latency" in phases else 0):
            for payload in kinds:
                for contender in [direct, *contenders]:
                    result = wrk(contender.url, payload, connections=1, threads=1,
                                 seconds=max(3, seconds // 2), latency=True)
                    contender.add(_key(payload, "p50"), result["p50"])
                    contender.add(_key(payload, "p99"), result["p99"])

        print("streaming", file=sys.stderr)
        for _ in range(rounds if "streaming" in phases else 0):
            for payload in kinds:
                for contender in [direct, *contenders]:
                    try:
                        ttft, rate = stream_stats(contender.url, stream_requests,
                                                  payload=None if payload is word else payload)
                    except AssertionError as exc:
                        if contender.name != "litellm":
                            raise
                        # LiteLLM's streams do not come through whole here (100 of 200
                        # chunks): its streaming is left out rather than timed half.
                        print(f"bench: litellm streaming left out: {exc}", file=sys.stderr)
                        ttft = rate = math.nan  # shown as "-"
                    contender.add(_key(payload, "ttft"), ttft)
                    contender.add(_key(payload, "chunks_per_s"), rate)

        print("turns: an agent's first and second turn", file=sys.stderr)
        for _ in range(rounds if "turns" in phases else 0):
            for contender in [direct, *contenders]:
                first, second = turn_latencies(contender.url, turn_requests)
                contender.add("turn1_p50", first)
                contender.add("turn2_p50", second)

        for contender in [direct, *contenders]:
            for key, values in contender.runs.items():
                contender.results[key] = (sum(values) if key.endswith(("errors", "timeouts"))
                                          else statistics.median(values))
            contender.results["peak_rss"] = rss_mb(contender.pid)[1]
    finally:
        if subscriber is not None:
            subscriber.terminate()
        for contender in contenders:
            stop(contender)
        stop(upstream)

    if phases != set(PHASES):
        for contender in [direct, *contenders]:
            print(contender.name, {k: round(v, 3) for k, v in contender.results.items()})
        return 0
    report = _report(direct, contenders, memory_marks, args)
    print(report["table"])
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.json").write_text(json.dumps(report["json"], indent=2))
    if args.write_docs:
        _write_docs(report)
    return 0


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def _report(direct: Contender, contenders: list[Contender], marks: tuple[int, int],
            args: argparse.Namespace) -> dict[str, Any]:
    floor = contenders[0].results
    rows = []
    header = ("| contender | req/s at 50 conc. | x floor | p50 ms (+ direct) | p99 ms | "
              "first chunk ms (+ floor) | chunks/s (x floor) | peak MiB | "
              f"MiB after {marks[0]:,} / {marks[1]:,} |")
    rows.append(header)
    rows.append("|" + " --- |" * 9)
    for contender in [direct, *contenders]:
        r = contender.results
        is_direct = contender is direct
        rps = "-" if is_direct else f"{r['rps']:,.0f}"
        ratio = "-" if is_direct else f"{r['rps'] / floor['rps']:.2f}"
        p50 = f"{r['p50']:.3f}" + ("" if is_direct else
                                   f" ({r['p50'] - direct.results['p50']:+.3f})")
        ttft = f"{r['ttft']:.2f}" + ("" if is_direct or contender is contenders[0] else
                                     f" ({r['ttft'] - floor['ttft']:+.2f})")
        chunk_ratio = r["chunks_per_s"] / floor["chunks_per_s"]
        chunks = f"{r['chunks_per_s']:,.0f}" + ("" if is_direct else f" ({chunk_ratio:.2f})")
        if math.isnan(r["ttft"]):
            ttft = chunks = "-"
        memory = "-" if is_direct else (f"{r[f'rss_after_{marks[0]}']:.1f} / "
                                        f"{r[f'rss_after_{marks[1]}']:.1f}")
        errors = "" if is_direct else _failures(r.get("errors"), r.get("timeouts"))
        rows.append(f"| {contender.name} | {rps}{errors} | {ratio} | {p50} | {r['p99']:.3f} | "
                    f"{ttft} | {chunks} | {r['peak_rss']:.1f} | {memory} |")
    rows.extend(["", _agent_table(direct, contenders), "", _turn_table(direct, contenders)])
    memory: dict[str, Any] = {}
    for candidate in contenders:
        if candidate.name == "hookproxy":
            memory = candidate.results
    marks_seen = sorted(int(k.rsplit("_", 1)[1]) for k in memory if k.startswith("agent_rss"))
    if marks_seen:
        rows.append("")
        rows.append("Memory of the realistic pipeline under 200 KB agent turns (both formats): "
                    + " / ".join(f"{memory[f'agent_rss_after_{m}']:.1f} MiB after {m:,}"
                                 for m in marks_seen) + ".")
    command = "python bench/run.py" + (" --quick" if args.quick else "") + " --write-docs"
    return {
        "table": "\n".join(rows),
        "command": command,
        "machine": _machine(),
        "json": {"machine": _machine(), "command": command,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "contenders": {c.name: c.results for c in [direct, *contenders]}},
        "contenders": [direct, *contenders],
    }


def _agent_table(direct: Contender, contenders: list[Contender]) -> str:
    floor = contenders[0].results
    rows = ["| 200 KB agent turn | contender | req/s at 50 conc. | x floor | p50 ms (+ direct) "
            "| p99 ms | first chunk ms (+ floor) |", "|" + " --- |" * 7]
    for kind in ("agent-openai", "agent-anthropic"):
        for contender in [direct, *contenders]:
            r = contender.results
            if f"{kind}:p50" not in r:
                continue
            is_direct = contender is direct
            rps = "-" if is_direct else f"{r[f'{kind}:rps']:,.0f}"
            rps += _failures(r.get(f"{kind}:errors"), r.get(f"{kind}:timeouts"))
            ratio = "-" if is_direct else f"{r[f'{kind}:rps'] / floor[f'{kind}:rps']:.2f}"
            added = r[f"{kind}:p50"] - direct.results[f"{kind}:p50"]
            p50 = f"{r[f'{kind}:p50']:.3f}" + ("" if is_direct else f" ({added:+.3f})")
            ttft = f"{r[f'{kind}:ttft']:.2f}" + (
                "" if is_direct or contender is contenders[0]
                else f" ({r[f'{kind}:ttft'] - floor[f'{kind}:ttft']:+.2f})")
            if math.isnan(r[f"{kind}:ttft"]):
                ttft = "-"
            rows.append(f"| {kind.removeprefix('agent-')} | {contender.name} | {rps} | {ratio} | "
                        f"{p50} | {r[f'{kind}:p99']:.3f} | {ttft} |")
    return "\n".join(rows)


def _turn_table(direct: Contender, contenders: list[Contender]) -> str:
    if "turn1_p50" not in direct.results:
        return ""
    rows = ["| an agent's turns, sequential p50 ms | turn 1 (+ direct) | turn 2 (+ direct) |",
            "| --- | --- | --- |"]
    for contender in [direct, *contenders]:
        r = contender.results
        cells = []
        for turn in ("turn1_p50", "turn2_p50"):
            added = "" if contender is direct else f" ({r[turn] - direct.results[turn]:+.3f})"
            cells.append(f"{r[turn]:.3f}{added}")
        rows.append(f"| {contender.name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _svg(contenders: list[Contender], direct: Contender) -> str:
    """Two bar charts: throughput, and sequential p50 added over direct."""
    proxies = [c for c in contenders]
    width, bar, gap, left = 760, 26, 12, 150
    height = 60 + 2 * (len(proxies) * (bar + gap) + 50)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="13">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    y = 30
    for title, key, unit, scale_of in (
            ("Throughput, requests/s at 50 concurrent (higher is better)", "rps", "", None),
            ("Added latency, sequential p50 over direct, ms (lower is better)", "p50", " ms",
             direct)):
        out.append(f'<text x="10" y="{y}" font-weight="bold">{title}</text>')
        y += 14
        values = [c.results[key] - (scale_of.results[key] if scale_of else 0) for c in proxies]
        top = max(max(values), 1e-9)
        for contender, value in zip(proxies, values, strict=True):
            length = max(2, (width - left - 120) * value / top)
            colour = "#3b6fd8" if contender.name.startswith("hookproxy") else "#999"
            out.append(f'<text x="10" y="{y + 18}">{contender.name}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" '
                       f'fill="{colour}"/>')
            label = f"{value:,.0f}" if key == "rps" else f"{value:.3f}{unit}"
            out.append(f'<text x="{left + length + 6:.1f}" y="{y + 18}">{label}</text>')
            y += bar + gap
        y += 36
    out.append("</svg>")
    return "\n".join(out)


def _write_docs(report: dict[str, Any]) -> None:
    contenders: list[Contender] = report["contenders"]
    direct, proxies = contenders[0], contenders[1:]
    (ROOT / "docs" / "performance.svg").write_text(_svg(proxies, direct))
    path = ROOT / "docs" / "performance.md"
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = (f"{begin}\nMeasured {report['json']['date']} on {report['machine']}, with "
             f"`{report['command']}`:\n\n{report['table']}\n\n"
             f"![throughput and added latency](performance.svg)\n{end}")
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
