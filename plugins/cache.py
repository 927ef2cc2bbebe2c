"""cache: exact-match response cache with a TTL and a size bound.

A request identical to an earlier one (same model, messages, tools and parameters, after
the Start plugins have run) is answered from the cache without calling a provider; a
streaming request gets the cached answer as a stream. The store sits behind
``proxy.store.Store``, so a shared store can replace the in-process one.

    [plugins.cache]
    ttl = 300               # seconds an answer stays
    max_entries = 10000     # the in-process store drops the least recently used past this
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from proxy import RequestContext, Response, hookimpl
from proxy.settings import settings_as, settings_error
from proxy.store import MemoryStore, Store


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    ttl: float = 300.0
    max_entries: int = 10_000


_stores: dict[int, Store] = {}
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Response).decode
_key_encoder = msgspec.json.Encoder(order="deterministic")


def store_for(config: Settings) -> Store:
    """One store per size bound, shared by every request with those settings."""
    if config.max_entries not in _stores:
        _stores[config.max_entries] = MemoryStore(config.max_entries)
    return _stores[config.max_entries]


def cache_key(ctx: RequestContext) -> str:
    # Streaming or not, the answer is the same: the key leaves the stream flags out.
    request = msgspec.structs.replace(ctx.request, stream=False, stream_usage=False)
    digest = hashlib.sha256(_key_encoder.encode(request)).hexdigest()
    return f"hookproxy:cache:{digest}"


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    problem = settings_error(settings, Settings)
    if problem is None and (settings.get("ttl", 1) <= 0 or settings.get("max_entries", 1) < 1):
        return "ttl and max_entries must be positive"
    return problem


@hookimpl(trylast=True)
async def pre_routing(ctx: RequestContext, settings: dict[str, Any]) -> Response | None:
    key = ctx.scratch["cache_key"] = cache_key(ctx)
    cached = await store_for(settings_as(settings, Settings)).get(key)
    ctx.scratch["cache"] = "hit" if cached is not None else "miss"
    return _decode(cached) if cached is not None else None


@hookimpl
async def post_response(ctx: RequestContext, response: Response,
                        settings: dict[str, Any]) -> None:
    key = ctx.scratch.get("cache_key")
    if key is None or ctx.scratch.get("cache") != "miss" or ctx.short_circuited_by:
        return
    if ctx.error is not None or response.finish_reason == "content_filter":
        return
    config = settings_as(settings, Settings)
    await store_for(config).set(key, _encode(response), config.ttl)
