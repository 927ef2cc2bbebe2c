"""Request ids: 32 hex digits from the operating system's random source, as before, but
read 256 ids at a time. ``os.urandom`` is a system call that lets go of the interpreter
lock, and once per request that handed the lock to the observer's thread mid-request."""

from __future__ import annotations

import os

_SIZE = 16  # bytes per id
_BATCH = 256  # ids per read
_random = b""
_at = 0


def new_request_id() -> str:
    """A new request id (called on the event loop, which is one thread)."""
    global _random, _at
    at = _at
    if at >= len(_random):
        _random, at = os.urandom(_SIZE * _BATCH), 0
    _at = at + _SIZE
    return _random[at:at + _SIZE].hex()


def _forget() -> None:
    # A forked child must not hand out the ids its parent has left.
    global _random, _at
    _random, _at = b"", 0


os.register_at_fork(after_in_child=_forget)
