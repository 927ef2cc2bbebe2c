"""A small key-value store interface with expiry, shared by the response cache (and later
by rate-limit counters), so that a shared store such as Redis can serve several replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config import Config


class Store(Protocol):
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Stores ``value`` for ``ttl`` seconds."""
        ...

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        """Adds ``amount`` to the integer under ``key`` (0 if absent), returns the new value;
        a new key expires after ``ttl`` seconds."""
        ...

    async def delete(self, key: str) -> bool:
        """Removes ``key``; whether it was there (and not expired)."""
        ...


class MemoryStore:
    """An in-process store: least recently used entries go first past ``max_entries``."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._clock = time.monotonic

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        current = await self.get(key)
        value = int(current or b"0") + amount
        expires = self._data[key][0] if current is not None else self._clock() + ttl
        self._data[key] = (expires, str(value).encode())
        self._data.move_to_end(key)
        return value

    async def delete(self, key: str) -> bool:
        item = self._data.pop(key, None)
        return item is not None and item[0] > self._clock()


def build_store(config: Config) -> Store:
    """The process's one store, which plugins reach as ``ctx.store`` / ``app.store``:
    in-process for now."""
    return MemoryStore(max_entries=100_000)
