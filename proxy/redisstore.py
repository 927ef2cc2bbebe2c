"""``Store`` in Redis, for several workers or replicas: ``[store] url = "redis://..."``.

redis-py's asyncio client (with hiredis to parse replies), one connection pool per
process. An admission is one Lua script — one round trip, atomic in Redis — that also
carries the settlements of the requests that ended since the last one, so settling costs
no round trip of its own. With no admission to carry them, they go together
``SETTLE_DELAY`` after the first. If Redis fails they wait, first in line, and are
applied when it is back, or at the close.

Every call is bounded by ``[store].timeout`` (the one bound: the connections have no
socket timeout of their own, which would cost each command a task). A call that fails or
times out raises ``StoreUnavailable`` (its caller fails open or closed, as configured), is
a warning in the app log and a count in ``hookproxy_store_errors_total``. After a failure
the store is not asked again for ``RETRY_AFTER`` seconds (so an unreachable Redis costs
requests nothing), then the next call tries again: Redis coming back is picked up by
itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from proxy.config import StoreConfig
from proxy.store import LAPSED_KEEP, Admission, Charge, StoreUnavailable

log = structlog.get_logger("hookproxy.store")
T = TypeVar("T")
# Seconds the store is left alone after a failure.
RETRY_AFTER = 0.5
# Seconds between two warnings about the same outage (each failure is still counted).
WARN_EVERY = 5.0

# One script answers an admission and carries the settlements that were waiting, so that
# a request costs one round trip: first the settlements, then (if there is one) the
# reservation. KEYS and ARGV are read in that order:
#   ARGV[1]: how many settlements; per settlement, KEYS: the scope's hold deadlines (zset)
#   and holds (hash), then its used counters; ARGV: hold id, number of counters, then per
#   counter: amount, ttl (ms).
#   The reservation, if ARGV goes on: KEYS: its scope's hold deadlines and holds, then per
#   charge its used and held counters; ARGV: hold id, hold ttl (ms), how long a lapsed
#   hold's mark is kept (ms), the ttl of the hold keys (ms), then per charge: amount,
#   limit, ttl (ms), held (1/0).
# Returns {per settlement: the used totals after it}, and for the reservation {admitted,
# 1-based index of the charge refused, the totals}. A settlement counts only while its hold
# (or the mark a lapsed hold leaves) is there, so one applied twice (a retry after a reply
# was lost) counts once. Amounts go to INCRBY as the strings they came as: a Lua number
# past 1e14 would be written as 1e+14.
ADMIT = """
-- A held counter back at 0 keeps its ttl; one below (it expired under a hold) goes.
local function release(held)
  local parts = cjson.decode(held)
  for i = 1, #parts, 2 do
    if redis.call('DECRBY', parts[i], parts[i + 1]) < 0 then redis.call('DEL', parts[i]) end
  end
end
-- A counter's window starts with its first charge.
local function add(key, amount, ttl)
  local total = redis.call('INCRBY', key, amount)
  if total == tonumber(amount) then redis.call('PEXPIRE', key, ttl, 'NX') end
  return total
end
local k, a = 1, 2
local settled = {}
for s = 1, tonumber(ARGV[1]) do
  local deadlines, holds, id, m = KEYS[k], KEYS[k + 1], ARGV[a], tonumber(ARGV[a + 1])
  k, a = k + 2, a + 2
  local held = redis.call('HGET', holds, id)
  if held then
    if held ~= 'lapsed' then release(held) end
    redis.call('HDEL', holds, id)
    redis.call('ZREM', deadlines, id)
  end
  local totals = {}
  for i = 1, m do
    if held and ARGV[a] ~= '0' then
      totals[i] = add(KEYS[k], ARGV[a], ARGV[a + 1])
    else
      totals[i] = tonumber(redis.call('GET', KEYS[k]) or '0')
    end
    k, a = k + 1, a + 2
  end
  settled[s] = totals
end
if ARGV[a] == nil then return {settled} end
local deadlines, holds, id = KEYS[k], KEYS[k + 1], ARGV[a]
local hold_ttl, keep, keys_ttl = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
k, a = k + 2, a + 4
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- Holds past their time are released and leave a mark (a late settlement still counts);
-- marks past theirs go.
local late = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, 100)
for _, old in ipairs(late) do
  local held = redis.call('HGET', holds, old)
  if held and held ~= 'lapsed' then
    release(held)
    redis.call('HSET', holds, old, 'lapsed')
    redis.call('ZADD', deadlines, now + keep, old)
  else
    redis.call('HDEL', holds, old)
    redis.call('ZREM', deadlines, old)
  end
end
local n = (#KEYS - k + 1) / 2
local totals = {}
local refused = 0
for i = 1, n do
  local base = a + (i - 1) * 4
  totals[i] = tonumber(redis.call('GET', KEYS[k + 2 * i - 2]) or '0')
  if ARGV[base + 3] == '1' then
    totals[i] = totals[i] + tonumber(redis.call('GET', KEYS[k + 2 * i - 1]) or '0')
  end
  local limit = tonumber(ARGV[base + 1])
  if refused == 0 and limit > 0 and totals[i] + tonumber(ARGV[base]) > limit then
    refused = i
  end
end
if refused > 0 then return {settled, {0, refused, unpack(totals)}} end
local record = {}
local holding = false
for i = 1, n do
  local base = a + (i - 1) * 4
  local amount = ARGV[base]
  local key = KEYS[k + 2 * i - 2]
  if ARGV[base + 3] == '1' then
    key = KEYS[k + 2 * i - 1]
    holding = true
  end
  if amount ~= '0' then
    add(key, amount, ARGV[base + 2])
    if ARGV[base + 3] == '1' then
      table.insert(record, key)
      table.insert(record, amount)
    end
  end
  totals[i] = totals[i] + tonumber(amount)
end
if holding then
  redis.call('HSET', holds, id, cjson.encode(record))
  redis.call('ZADD', deadlines, now + hold_ttl, id)
  -- The holds are kept as long as the counters they hold on (renewed when 10% is gone).
  if redis.call('PTTL', holds) < tonumber(keys_ttl) * 0.9 then
    redis.call('PEXPIRE', deadlines, keys_ttl)
    redis.call('PEXPIRE', holds, keys_ttl)
  end
end
return {settled, {1, 0, unpack(totals)}}
"""
# KEYS: a stream. ARGV: about how many entries it keeps, then the entries to add (each
# under the field "r").
APPEND = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i])
end
"""
# Seconds a settlement waits for an admission to carry it before it goes on its own
# (with the others waiting then, in one call).
SETTLE_DELAY = 0.01
# Settlements carried by one call, at most.
SETTLE_BATCH = 64
# Settlements kept while Redis is unreachable, to be applied when it is back; past this
# many the oldest are dropped (a warning and a count; their holds lapse by themselves).
SETTLE_QUEUE = 10_000
# Seconds the close waits for Redis to take the settlements still waiting.
CLOSE_WAIT = 5.0


class _Settlement:
    __slots__ = ("charges", "due", "hold", "scope", "waiter")

    def __init__(self, scope: str, hold: str, charges: Sequence[Charge],
                 waiter: asyncio.Future[list[int]] | None, due: float) -> None:
        self.scope, self.hold, self.charges, self.waiter = scope, hold, charges, waiter
        # When it goes on its own if no admission has carried it (the loop's clock).
        self.due = due


class RedisStore:
    shared = True

    def __init__(self, config: StoreConfig,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.prefix = config.prefix
        self.timeout = config.timeout
        self.on_error = on_error
        # A bounded pool that callers queue for (within the timeout). A call whose pooled
        # connection turns out broken (Redis restarted) is tried once more on a new one;
        # otherwise a failure is answered by the fail mode (settlements wait instead).
        # No socket timeout: ``_call`` bounds each call, and redis-py would run every
        # command's send in a task of its own to time it.
        self.pool = redis.BlockingConnectionPool.from_url(
            config.url, max_connections=config.connections, timeout=config.timeout,
            socket_timeout=None, socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)))
        self.client = redis.Redis(connection_pool=self.pool)
        self._admit = self.client.register_script(ADMIT)
        self._append = self.client.register_script(APPEND)
        # Read in bulk by the dashboard's relay: no parsing into dicts, entry by entry.
        self.client.set_response_callback("XREAD", _identity)
        # Settlements not yet in Redis, oldest first: the next admission carries them, or
        # a flush SETTLE_DELAY after the first came.
        self._settlements: deque[_Settlement] = deque()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._dropped = 0
        # Where the store is, for messages: never the URL, which may hold a password.
        url = urllib.parse.urlsplit(config.url)
        self.where = url.path if url.scheme == "unix" else f"{url.hostname}:{url.port or 6379}"
        self._down_until = 0.0
        self._down = False
        self._failures = 0
        self._warned = 0.0

    def fail_open(self, what: str) -> bool:
        mode = self.config.limits_on_error if what == "limits" else self.config.cache_on_error
        return mode == "open"

    async def get(self, key: str) -> bytes | None:
        # Replies are bytes: the client does not decode them.
        found: Any = await self._call("get", lambda: self.client.get(self.prefix + key))
        return found

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        found: Any = await self._call("get", lambda: self.client.mget(
            [self.prefix + k for k in keys]))
        return found

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("set", lambda: self.client.set(self.prefix + key, value,
                                                        px=_ms(ttl)))

    async def delete(self, key: str) -> bool:
        removed: Any = await self._call("delete", lambda: self.client.delete(
            self.prefix + key))
        return bool(removed)

    async def incr(self, key: str, amount: int, ttl: float) -> int:
        async def incr() -> int:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incrby(self.prefix + key, amount)
                pipe.pexpire(self.prefix + key, _ms(ttl), nx=True)
                value, _ = await pipe.execute()
            return int(value)

        return await self._call("incr", incr)

    async def reserve(self, scope: str, hold: str, charges: Sequence[Charge],
                      hold_ttl: float) -> Admission:
        """One round trip: the settlements waiting, then this reservation."""
        batch = self._take()
        keys, args = self._carry(batch)
        keys += self._hold_keys(scope)
        longest = max([hold_ttl * (1 + LAPSED_KEEP), *(c.ttl for c in charges if c.held)])
        args += [hold, _ms(hold_ttl), _ms(hold_ttl * LAPSED_KEEP), _ms(longest)]
        for charge in charges:
            used = self.prefix + charge.key
            keys += [used, used + ":held"]
            args += [str(charge.amount), str(charge.limit), _ms(charge.ttl),
                     "1" if charge.held else "0"]
        try:
            reply = await self._call("reserve", lambda: self._admit(keys=keys, args=args))
        except BaseException:  # unreachable, or cancelled (its client left): kept
            self._requeue(batch)
            raise
        self._settled(batch, reply[0])
        admitted, refused, *totals = (int(x) for x in reply[1])
        return Admission(admitted=bool(admitted), totals=totals, refused=refused - 1)

    async def settle(self, scope: str, hold: str, charges: Sequence[Charge]) -> list[int]:
        """Queued for the next admission to carry (or a flush soon after), so that it
        costs the requests no round trip of its own. If the call that carries it fails,
        this raises ``StoreUnavailable`` and the settlement stays queued, applied once
        Redis answers again (within ``SETTLE_QUEUE``; at shutdown, within the close)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._settlements.append(
            _Settlement(scope, hold, charges, waiter, loop.time() + SETTLE_DELAY))
        self._trim()
        self._schedule(SETTLE_DELAY)
        result: list[int] = await waiter
        return result

    def _take(self) -> list[_Settlement]:
        queue = self._settlements
        return [queue.popleft() for _ in range(min(len(queue), SETTLE_BATCH))]

    def _carry(self, batch: Sequence[_Settlement]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of ADMIT for ``batch``."""
        keys: list[str] = []
        args: list[Any] = [len(batch)]
        for settlement in batch:
            keys += self._hold_keys(settlement.scope)
            args += [settlement.hold, len(settlement.charges)]
            for charge in settlement.charges:
                keys.append(self.prefix + charge.key)
                args += [str(charge.amount), _ms(charge.ttl)]
        return keys, args

    def _settled(self, batch: Sequence[_Settlement], replies: Sequence[Any]) -> None:
        for settlement, totals in zip(batch, replies, strict=True):
            waiter = settlement.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result([int(x) for x in totals])

    def _requeue(self, batch: Sequence[_Settlement]) -> None:
        """Puts back the settlements of a call that failed, first in line; their waiters
        learn that it failed."""
        for settlement in reversed(batch):
            waiter, settlement.waiter, settlement.due = settlement.waiter, None, 0.0
            if waiter is not None and not waiter.done():
                waiter.set_exception(StoreUnavailable(
                    f"the store at {self.where} is unreachable"))
            self._settlements.appendleft(settlement)
        self._trim()
        if batch:
            self._schedule(max(SETTLE_DELAY, self._down_until - time.monotonic()))

    def _trim(self) -> None:
        queue = self._settlements
        dropped = 0
        while len(queue) > SETTLE_QUEUE:
            waiter = queue.popleft().waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(StoreUnavailable("too many settlements are waiting"))
            dropped += 1
            if self.on_error is not None:
                self.on_error("settle_dropped")
        if dropped:
            self._dropped += dropped
            log.warning("settlements_dropped", store=self.where, dropped=self._dropped,
                        kept=SETTLE_QUEUE, note="the store has been unreachable too long; "
                        "the oldest settlements are dropped and their holds lapse")

    def _schedule(self, delay: float) -> None:
        if self._flush_timer is None and self._flushing is None:
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        """Flushes once the oldest settlement is due: while admissions come often enough
        to carry them, none is."""
        self._flush_timer = None
        if not self._settlements:
            return
        loop = asyncio.get_running_loop()
        wait = self._settlements[0].due - loop.time()
        if wait > 0:
            self._schedule(wait)
        else:
            self._flushing = loop.create_task(self._flush())

    async def _flush(self) -> None:
        """Applies the waiting settlements, a batch per round trip, until none is left
        or Redis fails (they are then tried again once it may answer)."""
        try:
            while self._settlements:
                batch = self._take()
                keys, args = self._carry(batch)
                try:
                    reply = await self._call(
                        "settle", lambda: self._admit(keys=keys, args=args))  # noqa: B023
                except StoreUnavailable:
                    self._requeue(batch)
                    return
                except BaseException:
                    self._requeue(batch)
                    raise
                self._settled(batch, reply[0])
        finally:
            self._flushing = None
            if self._settlements:
                self._schedule(max(SETTLE_DELAY, self._down_until - time.monotonic()))

    # --- the dashboard's stream (proxy.feed.SharedFeed) ---------------------------------

    async def stream_add(self, name: str, items: Sequence[bytes], length: int) -> None:
        """Appends ``items`` to the stream ``name``, keeping about its last ``length``: one
        script for them all (a pipeline would cost a command's packing and parsing each)."""
        await self._call("stream_add", lambda: self._append(
            keys=[self.prefix + name], args=[length, *items]))

    async def stream_recent(self, name: str, count: int) -> list[tuple[str, bytes]]:
        """The last ``count`` entries of the stream, oldest first: (id, item)."""
        found: Any = await self._call("stream_read", lambda: self.client.xrevrange(
            self.prefix + name, count=count))
        return [(_text(i), fields[b"r"]) for i, fields in reversed(found)]

    async def stream_read(self, name: str, after: str) -> list[tuple[str, bytes]]:
        """Entries after the id ``after``, waiting for some up to half the timeout."""
        block = max(1, _ms(self.timeout / 2))
        # The reply as it came (XREAD's callback here is the identity): {stream: [[id,
        # [field, value]], ...]} (RESP3; RESP2 makes it pairs), or None.
        found: Any = await self._call("stream_read", lambda: self.client.execute_command(
            "XREAD", "COUNT", 500, "BLOCK", block, "STREAMS", self.prefix + name, after))
        streams = found.values() if isinstance(found, dict) else [e for _, e in found or ()]
        return [(_text(i), fields[1]) for entries in streams for i, fields in entries]

    async def close(self) -> None:
        """Applies the settlements still waiting (trying again while Redis does not answer,
        for at most ``CLOSE_WAIT`` seconds), then lets go of the connections."""
        deadline = time.monotonic() + CLOSE_WAIT
        while True:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if self._flushing is not None:
                await asyncio.wait([self._flushing])
                continue
            now = time.monotonic()
            if not self._settlements or now >= deadline:
                break
            await asyncio.sleep(max(0.0, min(self._down_until - now, deadline - now)))
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        if self._settlements:
            log.warning("settlements_lost", store=self.where, lost=len(self._settlements),
                        note="the store did not answer before shutdown")
        await self.client.aclose()

    def _hold_keys(self, scope: str) -> list[str]:
        return [f"{self.prefix}{scope}:hold-deadlines", f"{self.prefix}{scope}:holds"]

    async def _call(self, operation: str, work: Callable[[], Awaitable[T]]) -> T:
        """``work`` against Redis within the timeout; ``StoreUnavailable`` if it fails."""
        if self._down and time.monotonic() < self._down_until:
            self._failed(operation, None)
            raise StoreUnavailable(f"the store at {self.where} is unreachable")
        try:
            async with asyncio.timeout(self.timeout):
                result = await work()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc)
            # The idle connections are as dead as this one was: none is handed out again.
            await self.pool.disconnect(inuse_connections=False)
            raise StoreUnavailable(f"the store at {self.where} is unreachable") from None
        if self._down:
            self._down = False
            log.info("store_reachable_again", store=self.where, failed_calls=self._failures)
            self._failures = 0
        return result

    def _failed(self, operation: str, error: BaseException | None) -> None:
        now = time.monotonic()
        self._failures += 1
        if error is not None:
            self._down, self._down_until = True, now + RETRY_AFTER
        if self.on_error is not None:
            self.on_error(operation)
        if error is not None and now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("store_unreachable", store=self.where, operation=operation,
                        error=_describe(error), failed_calls=self._failures,
                        limits=self.config.limits_on_error, cache=self.config.cache_on_error)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _identity(response: Any, **options: Any) -> Any:
    return response


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"
