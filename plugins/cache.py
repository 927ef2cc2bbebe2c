"""cache: exact-match response cache with a TTL and a size bound.

A request identical to an earlier one (same model, messages, tools and parameters, after
the Start plugins have run) is answered from the cache without calling a provider; a
streaming request gets the cached answer as a stream.

Entries belong to a tenant: the caller's key (``ctx.tenant``, else ``ctx.caller``), so no
key is ever answered with what another key was told. A key with ``share_cache = true``
shares a pool with the other such keys (and with requests made without a key); the
operator can make every key share with ``shared = true``. An answer from the cache is
still judged against the key's models (``ctx.allow_models``) by the target that gave it.

What is cached is the answer as the plugins before the cache's hooks left it: ``redact``
restores the caller's originals after it (its hooks are ``trylast``), so an entry holds
placeholders, never one caller's masked values, and each caller gets only their own
originals back. The entries live in the process, or in Redis when ``[store]`` says so.

    [plugins.cache]
    ttl = 300               # seconds an answer stays
    max_entries = 10000     # the in-process store drops the least recently used past this
    shared = false          # true: one pool for every key
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from proxy import Reject, RequestContext, Response, StreamEvent, hookimpl, reports_changes
from proxy.canonical import StreamAccumulator
from proxy.routing import refused_by
from proxy.settings import settings_as, settings_error
from proxy.store import MemoryStore, Store, StoreUnavailable


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    ttl: float = 300.0
    max_entries: int = 10_000
    # One pool of entries for every key (default: each key its own).
    shared: bool = False


class Entry(msgspec.Struct, array_like=True):
    response: Response
    # The target that answered (and the group it answered for): a hit is judged
    # against the caller's models by it.
    provider: str
    model: str
    group: str | None


_stores: dict[int, Store] = {}
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode
_key_encoder = msgspec.json.Encoder(order="deterministic")
SHARED = "*"


def store_for(ctx: RequestContext, config: Settings) -> Store:
    """The process's store when it is shared (Redis); else one in-process store per size
    bound, of the cache's own (its entries never push a budget's counter out)."""
    if ctx.store is not None and ctx.store.shared:
        return ctx.store
    if config.max_entries not in _stores:
        _stores[config.max_entries] = MemoryStore(config.max_entries)
    return _stores[config.max_entries]


def tenant(ctx: RequestContext, config: Settings) -> str:
    """Whose entries this request may see: its key's own, or the shared pool."""
    if config.shared:
        return SHARED
    owner = ctx.tenant if ctx.tenant is not None else ctx.caller
    return owner or SHARED


def cache_key(ctx: RequestContext, config: Settings) -> str:
    # Streaming or not, the answer is the same: the key leaves the stream flags out.
    request = msgspec.structs.replace(ctx.request, stream=False, stream_usage=False)
    digest = hashlib.sha256(_key_encoder.encode(request)).hexdigest()
    owner = hashlib.sha256(tenant(ctx, config).encode()).hexdigest()[:32]
    return f"cache:{owner}:{digest}"


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    problem = settings_error(settings, Settings)
    if problem is None and (settings.get("ttl", 1) <= 0 or settings.get("max_entries", 1) < 1):
        return "ttl and max_entries must be positive"
    return problem


@hookimpl(trylast=True)
@reports_changes  # changes nothing in the request
async def pre_routing(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    config = settings_as(settings, Settings)
    key = ctx.scratch["cache_key"] = cache_key(ctx, config)
    store = store_for(ctx, config)
    try:
        cached = await store.get(key)
    except StoreUnavailable:
        _unavailable(ctx, store)
        return None
    entry = _decode(cached) if cached is not None else None
    if entry is not None and refused_by(ctx, entry.provider, entry.model, entry.group) is not None:
        entry = None  # a shared entry from a target this key may not reach
    ctx.scratch["cache"] = "hit" if entry is not None else "miss"
    if entry is None:
        if ctx.stream:
            ctx.scratch["cache_stream"] = StreamAccumulator()
        return None
    return entry.response


@hookimpl
@reports_changes  # changes no event
def stream_chunk(ctx: RequestContext, event: StreamEvent) -> Any:
    # A stream is cached as this hook sees it: before redact (trylast) restores it.
    accumulator: StreamAccumulator | None = ctx.scratch.get("cache_stream")
    if accumulator is not None:
        accumulator.add(event)
    return None


@hookimpl
@reports_changes  # changes nothing in the response
async def post_response(ctx: RequestContext, response: Response,
                        settings: dict[str, Any]) -> None:
    key = ctx.scratch.get("cache_key")
    if key is None or ctx.scratch.get("cache") != "miss" or ctx.short_circuited_by:
        return
    if ctx.error is not None or response.finish_reason == "content_filter":
        return
    accumulator: StreamAccumulator | None = ctx.scratch.pop("cache_stream", None)
    if accumulator is not None:
        response = accumulator.response
        response.model = response.model or (ctx.model or "")
    config = settings_as(settings, Settings)
    store = store_for(ctx, config)
    entry = Entry(response, ctx.provider or "", ctx.model or "", ctx.model_group)
    try:
        await store.set(key, _encode(entry), config.ttl)
    except StoreUnavailable:
        _unavailable(ctx, store, storing=True)


def _unavailable(ctx: RequestContext, store: Store, storing: bool = False) -> None:
    """The shared store did not answer: the cache is skipped (fail open) or, as the
    operator may choose, the request is refused (fail closed)."""
    ctx.scratch["cache"] = "unavailable"
    if not storing and not store.fail_open("cache"):
        raise Reject(503, "The response cache cannot be reached; retry shortly",
                     code="cache_unavailable", headers={"retry-after": "1"})

