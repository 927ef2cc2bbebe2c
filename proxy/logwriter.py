"""The JSONL request log, written off the request path.

Requests hand their encoded line to a bounded queue and go on; one thread writes what
has queued up in batches to a file opened for append, and rotates it by size. If the
queue is ever full the line is dropped and counted instead of slowing requests down.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("hookproxy.log")
_STOP = b""
BATCH = 512


class LogWriter:
    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 50 * 1024 * 1024,
                 keep: int = 5, queue_size: int = 10_000) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.written = 0
        self._reported_dropped = 0
        self._thread = threading.Thread(target=self._run, name="hookproxy-log", daemon=True)
        self._started = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        self._started = True

    def submit(self, line: bytes) -> bool:
        """Queues one line (ending in a newline); never blocks."""
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Writes everything queued, then stops."""
        if not self._started:
            return
        self.queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        self._started = False

    def _run(self) -> None:
        file = self.path.open("ab")
        try:
            while True:
                batch = [self.queue.get()]
                while len(batch) < BATCH:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                lines = [line for line in batch if line]
                if lines:
                    file.write(b"".join(lines))
                    file.flush()
                    self.written += len(lines)
                if self.dropped != self._reported_dropped:
                    log.warning("log entries dropped: the log queue was full",
                                dropped_total=self.dropped)
                    self._reported_dropped = self.dropped
                if stop:
                    return
                if file.tell() >= self.max_bytes:
                    file.close()
                    self._rotate()
                    file = self.path.open("ab")
        finally:
            file.close()

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
