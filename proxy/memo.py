"""Bounded memory for work that depends only on content.

An agent resends its whole history every turn. Whatever plugins and classifiers compute
from one piece of text (a classifier's verdict, redaction findings, a guard's verdict, a
token estimate) is the same every time that text comes back, so it is kept here, keyed by
what computed it and by the text itself, and a turn costs what its new messages cost.

Both bounds hold at once: at most ``max_entries`` results, and at most ``max_bytes`` of
text kept as keys (a key is the text itself: equal texts hit, and no hash collision can
hand one text's result to another). Least recently used results go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Text = TypeVar("Text", str, bytes)

# Texts shorter than this are not kept. Even a short text costs a pattern engine's
# per-call overhead (redact's patterns: 10 us for "You are terse.", the code classifier's
# 3 us), where a lookup costs under 1 us: only the shortest are scanned again.
MIN_CHARS = 4


class Memo:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int = 200_000) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[Hashable, str | bytes], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, what: Hashable, text: Text, compute: Callable[[Text], T],
                       size: int | None = None) -> T:
        """``compute(text)``, or what it gave the last time for this ``what`` and text.
        ``text`` may be bytes too (a message's ``content_key``, say). ``size`` as in
        ``put``.

        ``what`` names the computation and everything else its result depends on (a
        classifier's name and a digest of its settings, say): small, and not the text. A
        compiled object would do, but the memo would then keep it alive."""
        if len(text) < MIN_CHARS:
            return compute(text)
        key = (what, text)
        entries = self._entries
        lock = self._lock  # plugins may call this from worker threads too
        # acquire/release rather than ``with``: a third less work for a hit, the most
        # frequent call here.
        lock.acquire()
        try:
            found = entries.get(key)  # (result, size): never None
            if found is not None:
                entries.move_to_end(key)
                self.hits += 1
                result: T = found[0]
                return result
            self.misses += 1
        finally:
            lock.release()
        result = compute(text)  # outside the lock: the slow part, run by each caller
        self.put(what, text, result, size)
        return result

    def lookup_all(self, what: Hashable, texts: Sequence[Text]) -> list[Any]:
        """What was kept for each of ``texts`` under ``what`` (``put``), or None; one lock
        for all."""
        entries = self._entries
        results: list[Any] = []
        lock = self._lock
        lock.acquire()  # (as in get_or_compute)
        try:
            for text in texts:
                key = (what, text)
                found = entries.get(key)
                if found is None:
                    self.misses += 1
                    results.append(None)
                else:
                    entries.move_to_end(key)
                    self.hits += 1
                    results.append(found[0])
        finally:
            lock.release()
        return results

    def get_or_compute_all(self, what: Hashable, texts: Sequence[Text],
                           compute: Callable[[Text], T]) -> list[T]:
        """``get_or_compute`` for each of ``texts``, looked up under one lock."""
        if len(texts) == 1:  # most requests: one lookup, no lists
            return [self.get_or_compute(what, texts[0], compute)]
        long = [text for text in texts if len(text) >= MIN_CHARS]
        kept = iter(self.lookup_all(what, long))
        results = []
        for text in texts:
            result = next(kept) if len(text) >= MIN_CHARS else None
            if result is None:
                result = compute(text)
                if len(text) >= MIN_CHARS:
                    self.put(what, text, result)
            results.append(result)
        return results

    def put(self, what: Hashable, text: Text, result: Any, size: int | None = None) -> None:
        """Keeps ``result`` (not None) for ``what`` and ``text``. ``size`` is what the entry
        keeps, in bytes, when its result is large (else the text's size counts)."""
        if size is None:
            size = _size(text)
        if size > self.max_bytes:
            return
        key = (what, text)
        entries = self._entries
        with self._lock:
            if key not in entries:
                entries[key] = (result, size)
                self.bytes += size
            while entries and (self.bytes > self.max_bytes or len(entries) > self.max_entries):
                _, (_, old_size) = entries.popitem(last=False)
                self.bytes -= old_size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def _size(text: str | bytes) -> int:
    # An upper bound on what CPython keeps for the text: 1 byte a character for ASCII, at
    # most 4 otherwise (isascii is a flag lookup, not a scan).
    if isinstance(text, bytes):
        return len(text)
    return len(text) if text.isascii() else 4 * len(text)


# The process's one memo, shared by the built-in plugins and classifiers (and open to
# third-party ones). Its bounds come from [server].memo_bytes and memo_entries.
memo = Memo()


def configure(max_bytes: int, max_entries: int) -> None:
    memo.max_bytes, memo.max_entries = max_bytes, max_entries
    if memo.bytes > max_bytes or len(memo) > max_entries:
        memo.clear()
