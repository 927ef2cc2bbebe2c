"""The JSONL request log, written off the request path.

Requests hand their encoded line to a bounded queue and go on; one thread wakes every
``interval`` seconds, writes what has queued up as one batch to a file opened for append,
and rotates it by size. Waking on a timer rather than per line keeps the thread from
taking the interpreter away from the event loop on every request. If the queue is ever
full the line is dropped and counted instead of slowing requests down.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

import structlog

log = structlog.get_logger("hookproxy.log")


class LogWriter:
    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 50 * 1024 * 1024,
                 keep: int = 5, queue_size: int = 10_000, interval: float = 0.05) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.queue_size = queue_size
        self.interval = interval
        # deque.append and popleft are atomic: no lock on the request path.
        self.queue: deque[bytes] = deque()
        self._stop = threading.Event()
        self.dropped = 0
        self._reported_dropped = 0
        self._thread = threading.Thread(target=self._run, name="hookproxy-log", daemon=True)
        self._started = False

    def start(self) -> None:
        # The log holds prompts and answers: only its owner may read it. A folder the
        # proxy creates is 0700; one that exists already is left as it is, with a warning
        # when others may look inside.
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif folder.stat().st_mode & 0o077:
            log.warning("the log folder can be read by other users; the files in it are "
                        "0600, but consider chmod 700", folder=str(folder))
        self._thread.start()
        self._started = True

    def submit(self, line: bytes) -> bool:
        """Queues one line (ending in a newline); never blocks."""
        if len(self.queue) >= self.queue_size:
            self.dropped += 1
            return False
        self.queue.append(line)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Writes everything queued, then stops."""
        if not self._started:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._started = False

    def _run(self) -> None:
        file = self._open()
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                while self.queue:
                    lines: list[bytes] = []
                    while self.queue and len(lines) < 4096:
                        lines.append(self.queue.popleft())
                    file.write(b"".join(lines))
                    if file.tell() >= self.max_bytes:
                        file.close()
                        self._rotate()
                        file = self._open()
                file.flush()
                if self.dropped != self._reported_dropped:
                    log.warning("log entries dropped: the log queue was full",
                                dropped_total=self.dropped)
                    self._reported_dropped = self.dropped
                if stopping:
                    return
        finally:
            file.close()

    def _open(self) -> BinaryIO:
        """The log file for appending, 0600 (an older, wider file is narrowed)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab")

    def _rotate(self) -> None:
        """requests.jsonl -> requests.jsonl.1 -> .2 ...; the oldest beyond ``keep`` goes."""
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest.unlink(missing_ok=True)
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
