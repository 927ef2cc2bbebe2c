"""Benchmark of workers and the shared store, in front of bench/upstream.py on loopback:

  - throughput of ``hookproxy serve --workers 2`` against one worker (50 connections);
  - the p50 the Redis store adds to a request of a key with limits (rpm, tpm and a daily
    budget: one reservation before the provider call, one settlement after it, which the
    next admission carries) against the in-process store, one connection at a time; and
    how many Redis scripts a request made.

    python bench/shared.py              # a few minutes on 2 cores
    python bench/shared.py --quick

Needs wrk and redis-server (Debian packages). Results go to bench/results/shared.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    BARE,
    BENCH,
    BODY,
    LUA,
    PYTHON,
    ROOT,
    Contender,
    Payload,
    free_port,
    start,
    stop,
    wrk,
)

KEY = "bench-key-0123456789abcdef"
LIMITED = BARE + """
[auth.keys.bench]
key_env = "BENCH_KEY"
rpm = 100000000
tpm = 1000000000000
daily_budget = 1000000.0
"""
STORE = """
[store]
url = "{redis}"
"""


def redis_calls(port: int, command: str) -> int:
    """How often Redis has run ``command`` from a client so far (INFO commandstats)."""
    output = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                            capture_output=True, text=True, check=True).stdout
    for line in output.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    args = parser.parse_args()
    missing = [t for t in ("wrk", "redis-server", "redis-cli") if not shutil.which(t)]
    if missing:
        print(f"bench: needs {', '.join(missing)}: apt-get install wrk redis-server",
              file=sys.stderr)
        return 2
    rounds, seconds = (2, 3) if args.quick else (3, 8)
    workdir = Path(tempfile.mkdtemp(prefix="hookproxy-bench-shared-"))
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    upstream_port = free_port()
    upstream = start("upstream", [PYTHON, str(BENCH / "upstream.py"), "--port",
                                  str(upstream_port)], upstream_port)
    env = {**os.environ, "BENCH_KEY": KEY}
    plain = Payload("word", "/v1/chat/completions", BODY)
    plain.write_script(workdir)
    keyed = Payload("keyed", "/v1/chat/completions", BODY)
    keyed.script = workdir / "keyed.lua"
    keyed.script.write_text(LUA.format(body=BODY)
                            + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    contenders: list[Contender] = []

    def serve(name: str, config: str, *extra: str) -> Contender:
        port = free_port()
        path = workdir / f"{name}.toml"
        path.write_text(config.format(port=port, upstream=upstream.url,
                                      log=workdir / f"{name}.jsonl",
                                      redis=f"redis://127.0.0.1:{redis_port}/0"))
        process = subprocess.Popen([PYTHON, "-m", "proxy.cli", "serve", "--config", str(path),
                                    *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        contender = Contender(name, f"http://127.0.0.1:{port}", process)
        contenders.append(contender)
        deadline = time.monotonic() + 60
        while True:  # /health: requests need the key here
            try:
                urllib.request.urlopen(f"{contender.url}/health", timeout=2).read()
                return contender
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: did not start") from None
                time.sleep(0.2)

    try:
        one = serve("workers-1", BARE, "--workers", "1")
        two = serve("workers-2", BARE, "--workers", "2")
        memory = serve("limits-memory", LIMITED)
        shared = serve("limits-redis", LIMITED + STORE)
        time.sleep(2)  # the second worker of `two` finishes starting
        print(f"throughput: {rounds} rounds of {seconds}s at 50 connections", file=sys.stderr)
        for _ in range(rounds):
            for contender in (one, two):
                result = wrk(contender.url, plain, connections=50, threads=1, seconds=seconds)
                contender.add("rps", result["rps"])
                contender.add("errors", result["errors"])
        # Short rounds, the two stores back to back in alternating order: what the
        # Redis store adds is the median of the rounds' differences, which the load of
        # whatever else runs on the machine moves much less than either p50.
        pairs = 4 if args.quick else 12
        print(f"sequential latency of a key with limits: {pairs} pairs of 2s rounds",
              file=sys.stderr)
        scripts = requests = 0.0
        added: list[float] = []
        for pair in range(pairs):
            p50 = {}
            for contender in (memory, shared) if pair % 2 == 0 else (shared, memory):
                before = redis_calls(redis_port, "evalsha")
                result = wrk(contender.url, keyed, connections=1, threads=1, seconds=2,
                             latency=True)
                if contender is shared:
                    scripts += redis_calls(redis_port, "evalsha") - before
                    requests += result["requests"]
                p50[contender.name] = result["p50"]
                contender.add("p50", result["p50"])
                contender.add("p99", result["p99"])
                contender.add("errors", result["errors"])
            added.append(p50[shared.name] - p50[memory.name])
    finally:
        for contender in contenders:
            stop(contender)
        stop(upstream)
        redis.terminate()
        redis.wait(10)

    for contender in contenders:
        for key, values in contender.runs.items():
            contender.results[key] = sum(values) if key == "errors" else \
                statistics.median(values)
    report = {
        "workers_1_rps": one.results["rps"],
        "workers_2_rps": two.results["rps"],
        "workers_ratio": two.results["rps"] / one.results["rps"],
        "memory_store_p50_ms": memory.results["p50"],
        "redis_store_p50_ms": shared.results["p50"],
        # The median of the paired rounds' differences (see above).
        "redis_added_p50_ms": statistics.median(added),
        "redis_added_p50_ms_rounds": [round(x, 3) for x in added],
        "memory_store_p99_ms": memory.results["p99"],
        "redis_store_p99_ms": shared.results["p99"],
        # The admission's one script (which carries the previous requests'
        # settlements), and the dashboard feed's batched write every 50 ms.
        "redis_scripts_per_request": scripts / requests if requests else 0.0,
        "errors": sum(c.results.get("errors", 0) for c in contenders),
        "cores": os.cpu_count(),
        "quick": args.quick,
    }
    for name, value in report.items():
        print(f"{name:<26} {value:.3f}" if isinstance(value, float) else
              f"{name:<26} {value}")
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / "shared.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
