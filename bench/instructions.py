"""Instructions per request, counted by valgrind's callgrind: a measure that other work on
a shared machine does not move, for comparing two versions of the code.

The server runs under callgrind twice, answering ``--few`` and then ``--many`` requests of
one kind, sequentially; the difference in instructions, divided by the difference in
requests, is what one request costs (start-up and shutdown cancel out).

    python bench/instructions.py                       # realistic pipeline, 200 KB OpenAI
    python bench/instructions.py --config bare --kind agent-anthropic
    python bench/instructions.py --config bare --kind word
    python bench/instructions.py --config floor --kind word   # the bare passthrough
    python bench/instructions.py --config bare --kind word --keep-alive  # one connection

Needs valgrind (Debian's package). Slow: each request runs ~50x slower than natively.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from payloads import anthropic_body, openai_body
from run import BARE, BENCH, BODY, PYTHON, REALISTIC, ROOT, free_port, start, stop

KINDS = {
    "word": ("/v1/chat/completions", BODY.encode()),
    "agent-openai": ("/v1/chat/completions", json.dumps(openai_body()).encode()),
    "agent-anthropic": ("/v1/messages",
                        json.dumps(anthropic_body(model="bench-claude")).encode()),
}


def instructions(serve: list[str], port: int, path: str, body: bytes, requests: int,
                 out: Path, keep_alive: bool = False) -> int:
    """Instructions callgrind counted in a server (``serve``: its command) that answered
    ``requests`` requests: each on a connection of its own, or (``keep_alive``) all on
    one, as the throughput benchmark's clients send them."""
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         f"--log-file={out}.log", *serve],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            break
        except urllib.error.HTTPError:
            break  # it answers (the floor has no /health)
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start under valgrind") from None
            time.sleep(1)
    if keep_alive:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(requests):
            connection.request("POST", path, body, {"content-type": "application/json",
                                                    "anthropic-version": "2023-06-01"})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
        connection.close()
    for _ in range(0 if keep_alive else requests):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=body,
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200, response.status
    server.terminate()
    server.wait(300)
    said = Path(f"{out}.log").read_text()
    found = re.search(r"Collected : (\d+)", said)
    if found is None:
        raise RuntimeError(f"callgrind said no total: {said[-500:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("bare", "realistic", "floor"),
                        default="realistic")
    parser.add_argument("--kind", choices=sorted(KINDS), default="agent-openai")
    parser.add_argument("--few", type=int, default=4)
    parser.add_argument("--many", type=int, default=16)
    parser.add_argument("--keep-alive", action="store_true",
                        help="send every request on one kept-alive connection")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        print("bench: needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="hookproxy-instructions-"))
    upstream_port = free_port()
    upstream = start("upstream", [PYTHON, str(BENCH / "upstream.py"), "--port",
                                  str(upstream_port)], upstream_port)
    try:
        port = free_port()
        if args.config == "floor":
            serve = [PYTHON, str(BENCH / "floor.py"), "--port", str(port), "--upstream",
                     upstream.url]
        else:
            config = workdir / "config.toml"
            template = BARE if args.config == "bare" else REALISTIC
            config.write_text(template.format(port=port, upstream=upstream.url,
                                              log=workdir / "log.jsonl"))
            serve = [PYTHON, "-m", "proxy.cli", "serve", "--config", str(config)]
        path, body = KINDS[args.kind]
        few, many = (instructions(serve, port, path, body, n, workdir / f"callgrind.{n}",
                                  args.keep_alive)
                     for n in (args.few, args.many))
    finally:
        stop(upstream)
    per_request = (many - few) / (args.many - args.few)
    print(f"{args.config}, {args.kind}: {per_request / 1e6:.2f}M instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
