"""``hookproxy tail``: follows the JSONL request log, one readable line per request —
under ``serve --workers``, every worker's log at once."""

from __future__ import annotations

import glob
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

_decode = msgspec.json.Decoder().decode
COLOURS = {"ok": "\033[32m", "client": "\033[33m", "server": "\033[31m", "dim": "\033[2m",
           "bold": "\033[1m", "reset": "\033[0m"}


# Control characters (C0, DEL, C1) and the bidirectional overrides: a prompt carrying
# ANSI or OSC escape sequences must not recolour, retitle or rewrite the terminal.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({code: f"\\u{code:04x}" for code in (
    0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def safe_text(value: object) -> str:
    """``value`` as text fit for a terminal: control characters shown escaped."""
    return str(value).translate(_ESCAPES)


@dataclass
class Filters:
    model: str = ""
    provider: str = ""
    tag: str = ""
    endpoint: str = ""
    status: str = ""  # ok, error, 4xx, 5xx or a status code
    grep: str = ""

    def match(self, record: dict[str, Any], line: str) -> bool:
        models = f"{record.get('model', '')} {record.get('provider_model') or ''}".lower()
        if self.model and self.model.lower() not in models:
            return False
        if self.provider and self.provider.lower() not in (record.get("provider") or "").lower():
            return False
        if self.tag and not any(self.tag.lower() in t.lower() for t in record.get("tags", [])):
            return False
        if self.endpoint and self.endpoint.lower() not in str(record.get("endpoint",
                                                                         "")).lower():
            return False
        if self.status and not _status_matches(int(record.get("status", 0)), self.status):
            return False
        return not self.grep or self.grep.lower() in line.lower()


def _status_matches(status: int, wanted: str) -> bool:
    if wanted == "ok":
        return status < 400
    if wanted == "error":
        return status >= 400
    if wanted in ("4xx", "5xx"):
        return status // 100 == int(wanted[0])
    return str(status) == wanted


def format_record(record: dict[str, Any], colour: bool) -> str:
    def paint(text: str, name: str) -> str:
        return f"{COLOURS[name]}{text}{COLOURS['reset']}" if colour else text

    status = int(record.get("status", 0))
    kind = "ok" if status < 400 else "client" if status < 500 else "server"
    model = safe_text(record.get("model") or "-")
    answered = safe_text(record.get("provider") or "-")
    if record.get("provider_model"):
        answered += f"/{safe_text(record['provider_model'])}"
    parts = [
        paint(safe_text(str(record.get("time", ""))[11:23]), "dim"),
        paint(f"{status:3d}", kind),
        f"{model} -> {answered}",
        paint(safe_text(_short_endpoint(str(record.get("endpoint", "")))), "dim"),
        f"{record.get('duration_ms', 0):.1f}ms",
        f"{record.get('input_tokens', 0)}/{record.get('output_tokens', 0)} tok",
    ]
    if record.get("cost"):
        parts.append(f"${record['cost']:.6f}")
    if record.get("stream"):
        parts.append(f"stream:{record.get('chunks', 0)}")
    if record.get("tags"):
        parts.append(safe_text("[" + ",".join(map(str, record["tags"])) + "]"))
    if record.get("plugins"):
        parts.append(safe_text(
            "{" + ",".join(f"{k}:{v}" for k, v in record["plugins"].items()) + "}"))
    if record.get("cache_hit"):
        parts.append("cache-hit")
    attempts = record.get("attempts") or []
    if len(attempts) > 1:
        parts.append(f"attempts:{len(attempts)}")
    if record.get("error"):
        error = record["error"]
        parts.append(paint(safe_text(f"{error.get('stage', '')}: {error.get('message', '')}"),
                           kind))
    return "  ".join(parts)


def _short_endpoint(path: str) -> str:
    """``/v1/chat/completions`` -> ``chat/completions``; a long path cut."""
    short = path.removeprefix("/v1/")
    return short if len(short) <= 40 else short[:39] + "…"


def log_files(path: Path) -> list[Path]:
    """The log at ``path`` and, beside it, the workers' own (``requests-1.jsonl``...)."""
    found = [path] if path.exists() else []
    prefix = f"{path.stem}-"
    workers = [p for p in path.parent.glob(f"{glob.escape(prefix)}*{path.suffix}")
               if p.name[len(prefix):len(p.name) - len(path.suffix)].isdigit()]
    return found + sorted(workers, key=lambda p: int(p.name[len(prefix):].split(".")[0]))


class _Follower:
    """One log file followed across its rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("r", encoding="utf-8")
        self.pending = ""

    def last(self, count: int) -> list[str]:
        """Its last ``count`` lines; following goes on from its end."""
        if not count:
            self.handle.seek(0, os.SEEK_END)
            return []
        return list(deque(self.handle, maxlen=count))

    def new_lines(self) -> Iterator[str]:
        while True:
            chunk = self.handle.readline()
            if chunk:
                self.pending += chunk
                if self.pending.endswith("\n"):
                    yield self.pending
                    self.pending = ""
                continue
            try:
                rotated = self.path.stat().st_ino != os.fstat(self.handle.fileno()).st_ino
                shrunk = self.path.stat().st_size < self.handle.tell()
            except FileNotFoundError:
                rotated = shrunk = False
            if not (rotated or shrunk):
                return
            self.handle.close()
            self.handle = self.path.open("r", encoding="utf-8")

    def close(self) -> None:
        self.handle.close()


def _time(line: str) -> str:
    try:
        record = _decode(line)
    except msgspec.DecodeError:
        return ""
    return str(record.get("time", "")) if isinstance(record, dict) else ""


def _lines(path: Path, last: int, follow: bool, poll: float) -> Iterator[str]:
    """The last ``last`` lines of the log and the workers' logs beside it (in the order
    their requests came), then (following) new ones of each as they come, across
    rotations and workers that start later."""
    files = log_files(path)
    while follow and not files:
        time.sleep(poll)
        files = log_files(path)
    followers = {file: _Follower(file) for file in files}
    try:
        earlier = [line for f in followers.values() for line in f.last(last)]
        if len(followers) > 1:
            earlier.sort(key=_time)
        yield from earlier[-last:] if last else ()
        rescan = time.monotonic() + 1.0
        while follow:
            quiet = True
            for follower in list(followers.values()):
                for line in follower.new_lines():
                    quiet = False
                    yield line
            if time.monotonic() >= rescan:
                rescan = time.monotonic() + 1.0
                for file in log_files(path):
                    if file not in followers:
                        followers[file] = _Follower(file)  # a new worker: from its start
            if quiet:
                time.sleep(poll)
    finally:
        for follower in followers.values():
            follower.close()


def tail(path: Path, filters: Filters, *, last: int = 10, follow: bool = True,
         colour: bool | None = None, out: TextIO | None = None, poll: float = 0.2) -> int:
    out = out or sys.stdout
    colour = out.isatty() if colour is None else colour
    try:
        for line in _lines(path, last, follow, poll):
            try:
                record = _decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(record, dict) and filters.match(record, line):
                out.write(format_record(record, colour) + "\n")
                out.flush()
    except KeyboardInterrupt:
        pass
    return 0
