"""Which text of a request a classifier looks at, and how much of it.

Classifiers see the request's texts one message at a time, newest first, and at most
``max_chars`` characters in all (a setting of each classifier that scans text; 100,000 by
default): a 500 KB agent history costs what its newest part costs, and a classifier's
work per request has a bound whatever the client sends. Per-message results go through
``proxy.memo``, so a message that comes back on the next turn is not scanned again.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Iterable
from typing import Literal

from proxy import Request
from proxy.canonical import CLASSIFYING
from proxy.memo import memo

Scope = Literal["last", "messages", "all"]
MAX_CHARS = 100_000
# No setting may raise the bound past this.
MAX_CHARS_LIMIT = 10_000_000


def _message_texts(request: Request, scope: Scope) -> Iterable[str]:
    """One text per message, newest first. ``last``: the last user message with text;
    ``messages``: every message's text parts; ``all``: every message with its tool
    results, then the system prompt."""
    if scope == "all":
        return request.message_texts()
    if scope == "last":
        for message in reversed(request.messages):
            if message.role == "user":
                text = message.text
                if text:
                    return (text,)
        return ()
    # Lazily (the texts past ``max_chars`` are never made), and with no generator of ours
    # to resume per message.
    return filter(None, map(_TEXT, reversed(request.messages)))


_TEXT = operator.attrgetter("text")


def scoped_texts(request: Request, scope: Scope, max_chars: int = MAX_CHARS) -> list[str]:
    """The texts in ``scope``, newest first, cut to ``max_chars`` characters in all (the
    oldest text kept loses its beginning). While classifiers run (``proxy.pipeline`` marks
    the request, which no classifier changes), the texts are made once for all of them."""
    made: dict[tuple[str, int], list[str]] | None = request.__dict__.get(CLASSIFYING)
    if made is None:
        return _scoped_texts(request, scope, max_chars)
    texts = made.get((scope, max_chars))
    if texts is None:
        texts = made[(scope, max_chars)] = _scoped_texts(request, scope, max_chars)
    return texts


def _scoped_texts(request: Request, scope: Scope, max_chars: int) -> list[str]:
    out: list[str] = []
    budget = max_chars
    for text in _message_texts(request, scope):
        if budget <= 0:
            break
        if len(text) > budget:
            text = text[-budget:]
        out.append(text)
        budget -= len(text)
    return out


def scoped_text(request: Request, scope: Scope, max_chars: int = MAX_CHARS) -> str:
    """The texts in ``scope`` as one string, oldest first, at most ``max_chars``."""
    return "\n".join(reversed(scoped_texts(request, scope, max_chars)))


def any_text(request: Request, scope: Scope, max_chars: int, what: Hashable,
             test: Callable[[str], bool]) -> bool:
    """Whether ``test`` holds for any text in scope; each text's answer is memoized under
    ``what`` (which names the test and everything it depends on)."""
    for text in scoped_texts(request, scope, max_chars):
        if memo.get_or_compute(what, text, test):
            return True
    return False


def union_over_texts(request: Request, scope: Scope, max_chars: int, what: Hashable,
                     find: Callable[[str], frozenset[str]]) -> set[str]:
    """Everything ``find`` returns for the texts in scope, each text's answer memoized."""
    found: set[str] = set()
    for each in memo.get_or_compute_all(what, scoped_texts(request, scope, max_chars),
                                         find):
        found |= each
    return found


def max_chars_problem(value: object) -> str | None:
    if isinstance(value, int) and not 0 < value <= MAX_CHARS_LIMIT:
        return f"max_chars must be between 1 and {MAX_CHARS_LIMIT:,}"
    return None
