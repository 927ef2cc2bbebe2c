"""One contract, two stores: the in-process MemoryStore and RedisStore on a real
redis-server behave the same, reservations included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from proxy import redisstore
from proxy.config import StoreConfig
from proxy.redisstore import RedisStore
from proxy.store import Charge, MemoryStore, Store, StoreUnavailable
from tests.redis_server import RedisServer

Check = Callable[[Store], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    if request.param == "memory":
        yield MemoryStore
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = server.prefix()
    yield lambda: RedisStore(StoreConfig(url=server.url, prefix=prefix, timeout=1.0))


def run(make_store: Callable[[], Store], check: Check) -> None:
    async def main() -> None:
        store = make_store()
        try:
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_values_expire(make_store):
    async def check(store: Store) -> None:
        assert await store.get("a") is None
        await store.set("a", b"\x00one", 0.2)
        await store.set("b", b"two", 60)
        assert await store.get_many(["a", "b", "c"]) == [b"\x00one", b"two", None]
        await asyncio.sleep(0.3)
        assert await store.get("a") is None and await store.get("b") == b"two"

    run(make_store, check)


def test_counters_count_and_expire(make_store):
    async def check(store: Store) -> None:
        assert await store.incr("n", 2, 0.3) == 2
        assert await store.incr("n", 3, 60) == 5  # the first ttl stands
        assert await store.get("n") == b"5"
        await asyncio.sleep(0.4)
        assert await store.incr("n", 1, 60) == 1

    run(make_store, check)


def _charges(tokens: int = 10, money: int = 100) -> list[Charge]:
    return [Charge("k:rpm", 1, limit=3, ttl=60, held=False),
            Charge("k:tpm", tokens, limit=35, ttl=60),
            Charge("k:day", money, limit=1000, ttl=60)]


def test_a_reservation_is_all_or_nothing(make_store):
    async def check(store: Store) -> None:
        first = await store.reserve("k", "r1", _charges(), 60)
        assert first.admitted and first.totals == [1, 10, 100]
        second = await store.reserve("k", "r2", _charges(), 60)
        assert second.admitted and second.totals == [2, 20, 200]
        # 20 tokens held, 16 more do not fit: nothing of it is counted, not the request.
        refused = await store.reserve("k", "r3", _charges(tokens=16, money=1), 60)
        assert not refused.admitted and refused.refused == 1
        assert refused.totals == [2, 20, 200]
        third = await store.reserve("k", "r3", _charges(tokens=15, money=1), 60)
        assert third.admitted and third.totals == [3, 35, 201]
        fourth = await store.reserve("k", "r4", _charges(tokens=0, money=0), 60)
        assert not fourth.admitted and fourth.refused == 0 and fourth.totals == [3, 35, 201]
        # A charge with no limit is counted, never refused.
        free = await store.reserve("k", "r5", [Charge("k:tpm", 0, limit=0, ttl=60)], 60)
        assert free.admitted and free.totals == [35]

    run(make_store, check)


def test_settling_replaces_the_hold_with_what_was_used(make_store):
    async def check(store: Store) -> None:
        await store.reserve("k", "r1", _charges(tokens=20, money=500), 60)
        used = [Charge("k:tpm", 7, ttl=60), Charge("k:day", 120, ttl=60)]
        assert await store.settle("k", "r1", used) == [7, 120]
        # A settlement sent again (a retry after its reply was lost) neither releases
        # nor counts twice.
        assert await store.settle("k", "r1", used) == [7, 120]
        again = await store.reserve("k", "r2", _charges(tokens=28, money=1), 60)
        assert again.admitted and again.totals[1:] == [35, 121]

    run(make_store, check)


def test_a_hold_nobody_settles_lapses(make_store):
    async def check(store: Store) -> None:
        assert (await store.reserve("k", "dead", _charges(tokens=30), 0.2)).admitted
        assert not (await store.reserve("k", "r2", _charges(tokens=30), 60)).admitted
        await asyncio.sleep(0.3)
        late = await store.reserve("k", "r3", _charges(tokens=30), 60)
        assert late.admitted and late.totals[1] == 30
        # Its settlement, should it come after all, is still counted, once.
        assert await store.settle("k", "dead", [Charge("k:tpm", 4, ttl=60)]) == [4]

    run(make_store, check)


def test_concurrent_reservations_never_pass_the_limit(make_store):
    async def check(store: Store) -> None:
        async def one(n: int) -> bool:
            admission = await store.reserve(
                "c", f"r{n}", [Charge("c:rpm", 1, limit=50, ttl=60, held=False),
                               Charge("c:tpm", 3, limit=1000, ttl=60)], 60)
            return admission.admitted

        admitted = await asyncio.gather(*(one(n) for n in range(200)))
        assert sum(admitted) == 50

    run(make_store, check)


def test_large_amounts_stay_exact(make_store):
    async def check(store: Store) -> None:
        big = 123_456_789_012_345
        admission = await store.reserve("b", "r", [Charge("b:m", big, limit=10 ** 15)], 60)
        assert admission.totals == [big]
        assert await store.settle("b", "r", [Charge("b:m", big + 1)]) == [big + 1]

    run(make_store, check)


def test_redis_unreachable_is_store_unavailable_and_recovers(redis_server):
    server = RedisServer().start()
    failures: list[str] = []
    store = RedisStore(StoreConfig(url=server.url, timeout=0.5), failures.append)

    async def main() -> Any:
        await store.set("x", b"1", 60)
        server.stop()
        with pytest.raises(StoreUnavailable):
            await store.get("x")
        # Within RETRY_AFTER the store is not asked again: still a counted failure.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.incr("y", 1, 60)
        assert time.monotonic() - started < 0.5
        server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                return await store.incr("y", 1, 60)
            except StoreUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

    try:
        assert asyncio.run(main()) == 1
    finally:
        asyncio.run(store.close())
        server.stop()
    assert failures[:2] == ["get", "incr"]


# --- the Redis store's settlements: carried by admissions, kept through outages ----------


def _redis(server: RedisServer, timeout: float = 1.0) -> tuple[RedisStore, str]:
    prefix = server.prefix()
    return RedisStore(StoreConfig(url=server.url, prefix=prefix, timeout=timeout)), prefix


def _evalsha_calls(server: RedisServer) -> int:
    stats = redis.Redis(port=server.port).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_settlement_rides_with_the_next_admission(redis_server, monkeypatch):
    # Nothing flushes on its own here: only an admission can carry the settlement.
    monkeypatch.setattr(redisstore, "SETTLE_DELAY", 60.0)
    store, _ = _redis(redis_server)

    async def main() -> None:
        try:
            await store.reserve("k", "r1", _charges(tokens=20, money=500), 60)
            settling = asyncio.create_task(store.settle("k", "r1", [
                Charge("k:tpm", 7, ttl=60), Charge("k:day", 120, ttl=60)]))
            await asyncio.sleep(0)
            before = _evalsha_calls(redis_server)
            admission = await store.reserve("k", "r2", _charges(tokens=5, money=1), 60)
            # One round trip: the settlement was applied first, then the reservation.
            assert _evalsha_calls(redis_server) - before == 1
            assert await settling == [7, 120]
            assert admission.totals[1:] == [7 + 5, 120 + 1]
        finally:
            await store.close()

    asyncio.run(main())


def test_waiting_settlements_go_on_their_own_and_at_the_close(redis_server):
    store, prefix = _redis(redis_server)
    plain = redis.Redis(port=redis_server.port)

    async def main() -> None:
        await store.reserve("k", "r1", _charges(tokens=20), 60)
        await store.reserve("k", "r2", _charges(tokens=10), 60)
        # No admission follows: they go together, soon.
        assert await asyncio.gather(
            store.settle("k", "r1", [Charge("k:tpm", 7, ttl=60)]),
            store.settle("k", "r2", [Charge("k:tpm", 4, ttl=60)])) in ([[7], [11]],
                                                                        [[11], [7]])
        await store.reserve("k", "r3", _charges(tokens=10), 60)
        # The process shuts down with one still waiting: the close applies it.
        settling = asyncio.create_task(store.settle("k", "r3", [Charge("k:tpm", 2, ttl=60)]))
        await asyncio.sleep(0)
        await store.close()
        assert await settling == [13]

    asyncio.run(main())
    assert plain.get(prefix + "k:tpm") == b"13"
    assert int(plain.get(prefix + "k:tpm:held") or 0) == 0


def test_settlements_wait_out_a_redis_that_stalls_and_count_once(redis_server):
    store, prefix = _redis(redis_server, timeout=0.3)
    plain = redis.Redis(port=redis_server.port)

    async def main() -> None:
        try:
            await store.reserve("k", "r1", _charges(tokens=20), 60)
            # Redis stops answering (its clients are paused) for longer than the timeout.
            plain.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            with pytest.raises(StoreUnavailable):
                await store.settle("k", "r1", [Charge("k:tpm", 7, ttl=60)])
            # Kept, and applied once Redis answers again; the call that timed out may
            # have run too once the pause ended: the settlement still counts once.
            deadline = time.monotonic() + 10
            while plain.get(prefix + "k:tpm") != b"7":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # whatever else was to come has come
            assert plain.get(prefix + "k:tpm") == b"7"
            assert int(plain.get(prefix + "k:tpm:held") or 0) == 0
        finally:
            plain.execute_command("CLIENT", "UNPAUSE")
            await store.close()

    asyncio.run(main())
