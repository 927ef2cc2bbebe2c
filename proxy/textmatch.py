"""Matching text in time linear in its length, whatever the pattern or the text.

Patterns from config (and from requests, where the operator allows it) run on RE2
(``google-re2``), which has no backtracking: a pattern such as ``(a+)+$`` takes as long as
any other. RE2 has no lookaround and no backreferences; a pattern that uses them is a
settings error that says so. Word lists run through one Aho-Corasick automaton
(``pyahocorasick``): one pass over the text, however many words.

Compiled patterns and automatons are kept in small LRU caches keyed by their source, so a
settings table is compiled once, and no client can grow them without bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

import ahocorasick
import re2

# RE2's budget for one compiled pattern (its default is 8 MiB); a pattern needing more
# is refused when its settings are checked.
_OPTIONS = re2.Options()
_OPTIONS.max_mem = 8 << 20
_OPTIONS.log_errors = False  # a refused pattern is reported to whoever gave it
# Keywords longer than this are refused: each text position can then end only so many
# overlapping matches, which keeps a scan linear.
MAX_KEYWORD_CHARS = 200


def digest(source: object) -> bytes:
    """A short, stable name for a compiled table's source (what ``proxy.memo`` keys
    results by, so that the memo never keeps a compiled object alive)."""
    return hashlib.blake2b(repr(source).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def regex(pattern: str) -> re2._Regexp:
    """The compiled pattern (cached); raises ``re2.error`` when RE2 cannot take it."""
    return _regex(pattern)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re2._Regexp:
    return re2.compile(pattern, options=_OPTIONS)


def regex_problem(pattern: object) -> str | None:
    """Why ``pattern`` cannot be used, or None."""
    if not isinstance(pattern, str):
        return "must be a string"
    try:
        regex(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return (f"{pattern!r} is not a pattern hookproxy can run: {reason} (patterns run on "
                "RE2, in linear time: no lookahead, lookbehind or backreferences)")
    return None


class PatternSet:
    """Several patterns, searched for in one pass: which of them occur in a text."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.size = len(patterns)
        self.key = digest(patterns)
        self._set: re2.Set | None = None
        if patterns:
            self._set = re2.Set.SearchSet(_OPTIONS)
            for pattern in patterns:
                self._set.Add(pattern)
            self._set.Compile()

    def matching(self, text: str) -> frozenset[int]:
        """The indices of the patterns found in ``text``."""
        if self._set is None or not text:
            return frozenset()
        return frozenset(self._set.Match(text) or ())


@lru_cache(maxsize=64)
def pattern_set(patterns: tuple[str, ...]) -> PatternSet:
    return PatternSet(patterns)


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


class KeywordTable:
    """Words and phrases per tag, found case-insensitively and as whole words ("art"
    does not match "start") in one pass over the text."""

    def __init__(self, table: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        self.tags = tuple(tag for tag, words in table if words)
        self.key = digest(table)
        self._automaton: ahocorasick.Automaton | None = None
        if not self.tags:
            return
        automaton = ahocorasick.Automaton(ahocorasick.STORE_ANY)
        found: dict[str, list[tuple[int, int]]] = {}
        for number, (_, words) in enumerate(table):
            for word in words:
                key = word.lower()
                if key:
                    found.setdefault(key, []).append((number, len(key)))
        for key, owners in found.items():
            automaton.add_word(key, (tuple(n for n, _ in owners), owners[0][1]))
        automaton.make_automaton()
        self._automaton = automaton
        self._names = [tag for tag, _ in table]

    def tags_in(self, text: str) -> frozenset[str]:
        """The tags any of whose words occur in ``text``."""
        if self._automaton is None or not text:
            return frozenset()
        lowered = text.lower()
        size = len(lowered)
        hit: set[int] = set()
        wanted = len(self.tags)
        for end, (numbers, length) in self._automaton.iter(lowered):
            start = end - length + 1
            if (start > 0 and _is_word(lowered[start - 1])) or (
                    end + 1 < size and _is_word(lowered[end + 1])):
                continue
            hit.update(numbers)
            if len(hit) == wanted:
                break
        return frozenset(self._names[n] for n in hit)


@lru_cache(maxsize=64)
def keyword_table(table: tuple[tuple[str, tuple[str, ...]], ...]) -> KeywordTable:
    return KeywordTable(table)


def keyword_problem(words: Iterable[object]) -> str | None:
    for word in words:
        if not isinstance(word, str):
            return f"{word!r} is not a string"
        if len(word) > MAX_KEYWORD_CHARS:
            return f"{word[:40]!r}... is longer than {MAX_KEYWORD_CHARS} characters"
    return None
