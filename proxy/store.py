"""Shared state behind one interface: values with an expiry (the response cache, stored
answers, what plugins keep), counters, and the reservations that make limits exact.

Two implementations keep the same contract (tests/test_store.py runs it against both):
``MemoryStore`` in the process, for one worker, and ``proxy.redisstore.RedisStore``, for
several workers or replicas (``[store] url = "redis://..."``). ``build_store`` makes the
process's one store from the config.

Limits reserve before the provider call and settle after it. ``reserve`` checks and adds a
request's charges to every counter it falls under in one atomic step (all or none); each
held charge is kept as a *hold* until ``settle`` replaces it with what the request really
used. A hold nobody settles (a worker killed mid-request) is released once its
``hold_ttl`` has passed, so a crash cannot eat a budget for the rest of its window; it
leaves a mark, so that a settlement that comes after all still counts, once.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from proxy.config import Config


# A lapsed hold's mark is kept this many hold ttls: a settlement that comes after the hold
# lapsed still counts, once; one that comes again (a retry) does not count twice.
LAPSED_KEEP = 3
_LAPSED: list[tuple[str, int]] = []


class StoreUnavailable(Exception):
    """The shared store could not be reached in time; what depends on it decides whether
    to go on without it (fail open) or refuse (fail closed)."""


class Charge(msgspec.Struct, frozen=True):
    """What one request adds to one counter."""

    key: str
    amount: int
    # The counter may not pass this (0: counted, never refused).
    limit: int = 0
    # Seconds the counter lives from its first charge: its window.
    ttl: float = 60.0
    # Held until settled (tokens, spending), or final at once (a request counted by rpm).
    held: bool = True


class Admission(msgspec.Struct):
    admitted: bool
    # Per charge: what the counter stands at (used + held), after this reservation if it
    # was admitted, before it if not.
    totals: list[int]
    # The index of the first charge that did not fit, when refused.
    refused: int = -1


class Store(Protocol):
    # True when every worker and replica sees the same data (Redis); False in-process.
    shared: bool

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

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` of each key, in one round trip."""
        ...

    async def reserve(self, scope: str, hold: str, charges: Sequence[Charge],
                      hold_ttl: float) -> Admission:
        """Atomically: if every charge fits its limit, adds them all (the held ones as the
        hold ``hold`` within ``scope``, which lasts at most ``hold_ttl`` seconds); if one
        does not, adds none. Holds of ``scope`` past their time are released first."""
        ...

    async def settle(self, scope: str, hold: str, charges: Sequence[Charge]) -> list[int]:
        """Releases the hold ``hold`` and adds ``charges`` — what the request really used
        — to their counters' used part; returns each counter's used total after. Counted
        once: only while the hold, or the mark it left when it lapsed, is there (a
        settlement applied again, or more than ``LAPSED_KEEP`` hold ttls after the hold
        lapsed, adds nothing). The Redis store applies it with the next admission or soon
        after, so it costs no round trip of its own."""
        ...

    def fail_open(self, what: str) -> bool:
        """Whether ``what`` ("limits" or "cache") goes on without the store while it is
        unreachable, as ``[store]`` configures it."""
        ...

    async def close(self) -> None:
        """Lets go of connections; the store is not used again."""
        ...


class MemoryStore:
    """An in-process store. Values go least recently used first past ``max_entries``;
    counters and holds are kept apart from them (a burst of values never evicts a
    budget) and leave when they expire."""

    shared = False

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        # key -> [expires, used, held]
        self._counters: dict[str, list[float]] = {}
        # hold -> (deadline, [(key, amount)], hold ttl); a heap of deadlines finds the late
        # ones. A hold that lapsed leaves a mark (no amounts) for LAPSED_KEEP hold ttls.
        self._holds: dict[tuple[str, str], tuple[float, list[tuple[str, int]], float]] = {}
        self._deadlines: list[tuple[float, str, str]] = []
        self._clock = time.monotonic
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            counter = self._counter(key)
            return None if counter is None else str(int(counter[1])).encode()
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        counter = self._counter(key, ttl)
        assert counter is not None
        counter[1] += amount
        return int(counter[1])

    async def delete(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return self._counters.pop(key, None) is not None
        return item[0] > self._clock()

    async def reserve(self, scope: str, hold: str, charges: Sequence[Charge],
                      hold_ttl: float) -> Admission:
        now = self._clock()
        self._release_late(now)
        counters = [self._counter(c.key, c.ttl) for c in charges]
        totals = [int(c[1] + c[2]) for c in counters if c is not None]
        for index, charge in enumerate(charges):
            if charge.limit and totals[index] + charge.amount > charge.limit:
                return Admission(admitted=False, totals=totals, refused=index)
        held: list[tuple[str, int]] = []
        for index, (charge, counter) in enumerate(zip(charges, counters, strict=True)):
            assert counter is not None
            counter[2 if charge.held else 1] += charge.amount
            totals[index] += charge.amount
            if charge.held and charge.amount:
                held.append((charge.key, charge.amount))
        if any(charge.held for charge in charges):
            deadline = now + hold_ttl
            self._holds[(scope, hold)] = (deadline, held, hold_ttl)
            heapq.heappush(self._deadlines, (deadline, scope, hold))
        return Admission(admitted=True, totals=totals)

    async def settle(self, scope: str, hold: str, charges: Sequence[Charge]) -> list[int]:
        settling = self._release(scope, hold)
        totals = []
        for charge in charges:
            counter = self._counter(charge.key, charge.ttl)
            assert counter is not None
            if settling:
                counter[1] += charge.amount
            totals.append(int(counter[1]))
        return totals

    def fail_open(self, what: str) -> bool:
        return True  # never unreachable

    async def close(self) -> None:
        pass

    def _counter(self, key: str, ttl: float | None = None) -> list[float] | None:
        """The live counter under ``key``; with ``ttl``, a new one if there is none."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        counter = self._counters.get(key)
        if counter is not None and counter[0] <= now:
            del self._counters[key]
            counter = None
        if counter is None and ttl is not None:
            counter = self._counters[key] = [now + ttl, 0, 0]
        return counter

    def _sweep(self, now: float) -> None:
        # Expired counters are dropped as they are met; this catches the ones never met
        # again (last month's), at most once a minute.
        self._next_sweep = now + 60
        for key in [k for k, c in self._counters.items() if c[0] <= now]:
            del self._counters[key]

    def _release(self, scope: str, hold: str) -> bool:
        """Releases the hold (or its lapsed mark); whether it was there."""
        found = self._holds.pop((scope, hold), None)
        if found is None:
            return False
        for key, amount in found[1]:
            counter = self._counters.get(key)
            if counter is not None:
                counter[2] -= amount
        return True

    def _release_late(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, scope, hold = heapq.heappop(deadlines)
            found = self._holds.get((scope, hold))
            if found is None or found[0] != deadline:
                continue
            self._release(scope, hold)
            if found[1] is not _LAPSED:
                # Its mark stays a while: a settlement that comes later still counts, once.
                mark = now + found[2] * LAPSED_KEEP
                self._holds[(scope, hold)] = (mark, _LAPSED, found[2])
                heapq.heappush(deadlines, (mark, scope, hold))
        # Settled holds leave their deadline behind: rebuild once they dominate.
        if len(deadlines) > 64 and len(deadlines) > 4 * len(self._holds):
            self._deadlines = [(d, s, h) for (s, h), (d, _, _) in self._holds.items()]
            heapq.heapify(self._deadlines)


def build_store(config: Config, on_error: Callable[[str], None] | None = None) -> Store:
    """The process's one store, as ``[store]`` configures it: Redis when a URL is given,
    else in-process. Everything that keeps shared state uses this one object, and plugins
    reach it as ``ctx.store`` / ``app.store``. ``on_error`` is told the operation of each
    call that failed (for the metrics)."""
    if config.store.url:
        from proxy.redisstore import RedisStore

        return RedisStore(config.store, on_error)
    return MemoryStore(max_entries=config.store.max_entries)
