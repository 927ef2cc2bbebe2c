"""``Store`` in Redis, for several workers or replicas: ``[store] url = "redis://..."``.

redis-py's asyncio client (with hiredis to parse replies), one connection pool per
process. A reservation and a settlement are one Lua script each — one round trip, atomic
in Redis. Every call is bounded by ``[store].timeout``; a call that fails or times out
raises ``StoreUnavailable`` (its caller fails open or closed, as configured), is a warning
in the app log and a count in ``hookproxy_store_errors_total``. After a failure the store
is not asked again for ``RETRY_AFTER`` seconds (so an unreachable Redis costs requests
nothing), then the next call tries again: Redis coming back is picked up by itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from proxy.config import StoreConfig
from proxy.store import Admission, Charge, StoreUnavailable

log = structlog.get_logger("hookproxy.store")
T = TypeVar("T")
# Seconds the store is left alone after a failure.
RETRY_AFTER = 0.5
# Seconds between two warnings about the same outage (each failure is still counted).
WARN_EVERY = 5.0

# KEYS: the scope's hold deadlines (zset) and holds (hash), then per charge its used and
# held counters. ARGV: hold id, hold ttl (ms), the longest ttl of a held counter (ms),
# then per charge: amount, limit, ttl (ms), held (1/0). Amounts go to INCRBY as the
# strings they came as: a Lua number past 1e14 would be written as 1e+14.
RESERVE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local late = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(late) do
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    local parts = cjson.decode(held)
    for i = 1, #parts, 2 do
      if redis.call('DECRBY', parts[i], parts[i + 1]) <= 0 then redis.call('DEL', parts[i]) end
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
local n = (#KEYS - 2) / 2
local totals = {}
local refused = 0
for i = 1, n do
  local used = tonumber(redis.call('GET', KEYS[1 + 2 * i]) or '0')
  local held = tonumber(redis.call('GET', KEYS[2 + 2 * i]) or '0')
  local base = 4 + (i - 1) * 4
  totals[i] = used + held
  local limit = tonumber(ARGV[base + 1])
  if refused == 0 and limit > 0 and totals[i] + tonumber(ARGV[base]) > limit then
    refused = i
  end
end
if refused > 0 then return {0, refused, unpack(totals)} end
local record = {}
for i = 1, n do
  local base = 4 + (i - 1) * 4
  local amount = ARGV[base]
  local key = KEYS[1 + 2 * i]
  if ARGV[base + 3] == '1' then key = KEYS[2 + 2 * i] end
  if amount ~= '0' then
    redis.call('INCRBY', key, amount)
    redis.call('PEXPIRE', key, ARGV[base + 2], 'NX')
    if ARGV[base + 3] == '1' then
      table.insert(record, key)
      table.insert(record, amount)
    end
  end
  totals[i] = totals[i] + tonumber(amount)
end
if #record > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(record))
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  -- The holds are kept as long as the counters they hold on.
  for k = 1, 2 do
    if redis.call('PTTL', KEYS[k]) < tonumber(ARGV[3]) then
      redis.call('PEXPIRE', KEYS[k], ARGV[3])
    end
  end
end
return {1, 0, unpack(totals)}
"""

# KEYS: the scope's hold deadlines and holds, then the used counters. ARGV: hold id, then
# per counter: amount, ttl (ms).
SETTLE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local parts = cjson.decode(held)
  for i = 1, #parts, 2 do
    if redis.call('DECRBY', parts[i], parts[i + 1]) <= 0 then redis.call('DEL', parts[i]) end
  end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
local totals = {}
for i = 3, #KEYS do
  local base = 2 + (i - 3) * 2
  if ARGV[base] ~= '0' then
    totals[i - 2] = redis.call('INCRBY', KEYS[i], ARGV[base])
    redis.call('PEXPIRE', KEYS[i], ARGV[base + 1], 'NX')
  else
    totals[i - 2] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
return totals
"""


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
        # nothing else is retried: a failure is answered by the fail mode.
        self.pool = redis.BlockingConnectionPool.from_url(
            config.url, max_connections=config.connections, timeout=config.timeout,
            socket_timeout=config.timeout, socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)))
        self.client = redis.Redis(connection_pool=self.pool)
        self._reserve = self.client.register_script(RESERVE)
        self._settle = self.client.register_script(SETTLE)
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
        keys = self._hold_keys(scope)
        args: list[Any] = [hold, _ms(hold_ttl),
                           _ms(max([hold_ttl, *(c.ttl for c in charges if c.held)]))]
        for charge in charges:
            used = self.prefix + charge.key
            keys += [used, used + ":held"]
            args += [str(charge.amount), str(charge.limit), _ms(charge.ttl),
                     "1" if charge.held else "0"]
        reply = await self._call("reserve", lambda: self._reserve(keys=keys, args=args))
        admitted, refused, *totals = (int(x) for x in reply)
        return Admission(admitted=bool(admitted), totals=totals, refused=refused - 1)

    async def settle(self, scope: str, hold: str, charges: Sequence[Charge]) -> list[int]:
        keys = self._hold_keys(scope) + [self.prefix + c.key for c in charges]
        args: list[Any] = [hold]
        for charge in charges:
            args += [str(charge.amount), _ms(charge.ttl)]
        reply = await self._call("settle", lambda: self._settle(keys=keys, args=args))
        return [int(x) for x in reply]

    # --- the dashboard's stream (proxy.feed.SharedFeed) ---------------------------------

    async def stream_add(self, name: str, items: Sequence[bytes], length: int) -> None:
        """Appends ``items`` to the stream ``name``, keeping about its last ``length``."""
        async def add() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for item in items:
                    pipe.xadd(self.prefix + name, {b"r": item}, maxlen=length,
                              approximate=True)
                await pipe.execute()

        await self._call("stream_add", add)

    async def stream_recent(self, name: str, count: int) -> list[tuple[str, bytes]]:
        """The last ``count`` entries of the stream, oldest first: (id, item)."""
        found: Any = await self._call("stream_read", lambda: self.client.xrevrange(
            self.prefix + name, count=count))
        return [(_text(i), fields[b"r"]) for i, fields in reversed(found)]

    async def stream_read(self, name: str, after: str) -> list[tuple[str, bytes]]:
        """Entries after the id ``after``, waiting for some up to half the timeout."""
        block = max(1, _ms(self.timeout / 2))
        found: Any = await self._call("stream_read", lambda: self.client.xread(
            {self.prefix + name: after}, count=500, block=block))
        return [(_text(i), fields[b"r"]) for _, entries in found or ()
                for i, fields in entries]

    async def close(self) -> None:
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"
