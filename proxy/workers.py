"""``hookproxy serve --workers N``: N worker processes serving one port.

The supervisor binds the socket once and starts each worker (a fresh interpreter,
``spawn``) with it; the kernel hands each connection to one of them. It forwards SIGHUP
(and a worker's ``/admin/reload``) to every worker, each of which reloads as a single
process does; SIGTERM or SIGINT drains them all; a worker that dies is replaced. Workers
count /metrics together (prometheus-client's multiprocess mode, in a folder of the
supervisor's own), each writes a log file of its own (``requests-1.jsonl``...), and with
``[store]`` they share limits, the cache, routing's lessons and the dashboard's feed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import structlog

from proxy.config import Config

log = structlog.get_logger("hookproxy.workers")
# A worker that dies within this many seconds of starting is replaced only after as long.
RESTART_BACKOFF = 1.0
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# A worker's exit code when its config or a plugin's startup hook failed.
STARTUP_FAILED = 2


def worker_count(config: Config, asked: int | str | None) -> int:
    """``--workers`` if given, else ``[server].workers``; "auto" is the usable cores."""
    wanted = asked if asked is not None else config.server.workers
    if wanted == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(wanted)


def shared_state_problem(config: Config, workers: int) -> str | None:
    """Why ``workers`` processes cannot serve ``config`` without ``[store]``: limits and
    the cache hold only if every worker shares them."""
    if workers < 2 or config.store.url:
        return None
    stateful = [f"the limits of key {name!r}" for name, key in config.auth.keys.items()
                if key.rpm or key.tpm or key.daily_budget or key.monthly_budget]
    cache = config.plugins.get("cache")
    if cache is not None and cache.get("enabled", True):
        stateful.append("the response cache")
    if not stateful:
        return None
    return (f"{config.source}: {workers} workers need [store] url = \"redis://...\": "
            f"{', '.join(stateful)} must be shared by the workers to hold (each would "
            "otherwise allow the full limit, or cache apart); configure [store], or run "
            "one worker")


def log_path(path: str, index: int) -> str:
    """Worker ``index``'s own log file beside ``path``: ``requests-1.jsonl``..."""
    if not path:
        return path
    file = Path(path)
    return str(file.with_name(f"{file.stem}-{index}{file.suffix}"))


def run_workers(config: Config, count: int, host: str, port: int) -> int:
    """Serves ``config`` on ``host:port`` with ``count`` workers until told to stop."""
    multiprocessing.allow_connection_pickling()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        log.error("cannot listen", address=f"{host}:{port}", error=exc.strerror)
        return 1
    sock.listen(2048)
    sock.set_inheritable(True)
    metrics = tempfile.mkdtemp(prefix="hookproxy-metrics-")
    os.environ[METRICS_DIR] = metrics
    supervisor = _Supervisor(config, count, host, port, sock)
    try:
        return supervisor.run()
    finally:
        sock.close()
        shutil.rmtree(metrics, ignore_errors=True)


class _Supervisor:
    def __init__(self, config: Config, count: int, host: str, port: int,
                 sock: socket.socket) -> None:
        self.config, self.count, self.host, self.port, self.sock = \
            config, count, host, port, sock
        self.processes: dict[int, tuple[SpawnProcess, float]] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda number, frame: self.signals.append(number))
        for index in range(1, self.count + 1):
            self._start(index)
        log.info("workers started", workers=self.count, url=f"http://{self.host}:{self.port}",
                 pids=[p.pid for p, _ in self.processes.values()])
        while not self.stopping:
            time.sleep(0.2)
            self._handle_signals()
            if not self.stopping:
                self._replace_dead()
        return self._stop()

    def _start(self, index: int) -> None:
        process = multiprocessing.get_context("spawn").Process(
            target=serve_worker, name=f"hookproxy-worker-{index}",
            args=(self.config.source, self.host, self.port, index, self.sock))
        process.start()
        self.processes[index] = (process, time.monotonic())

    def _handle_signals(self) -> None:
        while self.signals:
            number = self.signals.pop(0)
            if number == signal.SIGHUP:
                log.info("reloading every worker")
                for process, _ in self.processes.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid or 0, signal.SIGHUP)
            else:
                self.stopping = True

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for index, (process, started) in list(self.processes.items()):
            # One that dies as it starts is replaced no more than once a RESTART_BACKOFF.
            if process.is_alive() or now - started < RESTART_BACKOFF:
                continue
            if process.exitcode == STARTUP_FAILED:
                # Its config or a plugin's startup failed: every replacement would too.
                log.error("a worker could not start; stopping", worker=index)
                self.stopping, self.failed = True, True
                return
            log.warning("worker died; replacing it", worker=index, pid=process.pid,
                        exit_code=process.exitcode)
            process.join(1)
            self._start(index)

    def _stop(self) -> int:
        """SIGTERM to every worker: each stops accepting and lets its requests finish."""
        for process, _ in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process, _ in self.processes.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
        # A worker still starting when told to stop has nothing to drain: it just ends.
        failed = [p.exitcode for p, _ in self.processes.values()
                  if p.exitcode not in (0, -signal.SIGTERM)]
        log.info("workers stopped", exit_codes=[p.exitcode for p, _ in self.processes.values()])
        return 2 if self.failed else 1 if failed else 0


def serve_worker(source: str, host: str, port: int, index: int, sock: Any) -> None:
    """One worker: the same Gateway and server a single process runs, on ``sock``."""
    from proxy.cli import configure_logging, run_server
    from proxy.config import ConfigError, load_config

    configure_logging(worker=index)
    try:
        config = load_config(source)
        config.log.path = log_path(config.log.path, index)
        code = run_server(config, host, port, sockets=[sock], supervised=True)
    except ConfigError as exc:
        # The file changed since the supervisor read it; the others keep serving.
        log.error("worker cannot start", worker=index, error=str(exc))
        code = 2
    raise SystemExit(code)
