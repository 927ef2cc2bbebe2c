"""The request record: one per request, whatever happened to it. It is the JSONL log line,
the dashboard's event and what the metrics count.

Fields (``None`` and empty ones are left out of the JSON):

==================  ===========================================================
id                  request id (also the ``x-request-id`` response header)
time                ISO 8601 UTC time the request arrived
endpoint, format    ``/v1/chat/completions`` + ``openai`` or ``/v1/messages`` + ``anthropic``
caller              the caller's key name (never the key)
model               the model the client asked for
route               the model group a route rule sent it to
provider, provider_model   who answered (``plugin`` + plugin name for a short-circuit)
tags                classifiers' tags; classifier_errors: classifier -> why it has none
plugins             plugin -> modified | short_circuit | rejected | failed
attempts            provider calls: provider, model, status (0: no answer), error, latency_ms
stream              streaming or not; chunks: events sent; failed_at_chunk: where it broke
status              HTTP status the client got (499: the client left)
error               type, message, stage, plugin
duration_ms         total time; ttft_ms: time to the first chunk (streams)
upstream_ms         time spent waiting for providers; overhead_ms: the rest
input_tokens, output_tokens, cost   usage, and cost from the configured prices
cache_hit           answered by the response cache
finish_reason       stop | length | tool_calls | content_filter
request, response   bodies, per ``[log].bodies``: none, truncated or full
==================  ===========================================================
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from proxy.context import Attempt, RequestContext

Bodies = Literal["none", "truncated", "full"]
_SECRET_KEYS = ("key", "token", "secret", "authorization", "password")
_encode = msgspec.json.Encoder().encode


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    type: str
    message: str
    stage: str = ""
    plugin: str | None = None


class Record(msgspec.Struct, omit_defaults=True):
    id: str
    time: str
    endpoint: str
    format: str
    status: int
    model: str = ""
    caller: str | None = None
    route: str | None = None
    provider: str | None = None
    provider_model: str | None = None
    tags: list[str] = []
    classifier_errors: dict[str, str] = {}
    plugins: dict[str, str] = {}
    attempts: list[Attempt] = []
    stream: bool = False
    chunks: int = 0
    failed_at_chunk: int | None = None
    error: ErrorInfo | None = None
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    upstream_ms: float = 0.0
    overhead_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cache_hit: bool = False
    finish_reason: str | None = None
    request: Any = None
    response: Any = None


def _iso(started_wall: float) -> str:
    return datetime.fromtimestamp(started_wall, UTC).isoformat(timespec="milliseconds")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _body(value: Any, bodies: Bodies, limit: int) -> Any:
    if bodies == "none" or value is None:
        return None
    # The common case costs one msgspec encode: a body whose whole JSON is shorter than the
    # limit has no string to cut, and is embedded as it is encoded.
    encoded = _encode(value)
    extra = getattr(value, "extra", None) or {}
    secret = any(_is_secret(k) for k in extra)
    if not secret and (bodies == "full" or len(encoded) <= limit):
        return msgspec.Raw(encoded)
    return _scrub(msgspec.json.decode(encoded), limit if bodies == "truncated" else 0)


def _is_secret(key: str) -> bool:
    key = key.lower()
    return any(s in key for s in _SECRET_KEYS)


def _scrub(value: Any, limit: int) -> Any:
    """Drops secret-looking keys; with ``limit``, cuts long strings."""
    if isinstance(value, dict):
        return {k: ("[redacted]" if isinstance(v, str) and _is_secret(k) else _scrub(v, limit))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, limit) for v in value]
    if limit and isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit} more characters]"
    return value


def build_record(ctx: RequestContext, *, bodies: Bodies = "truncated", limit: int = 2000) -> Record:
    timings = ctx.timings
    total = timings.get("total", time.perf_counter() - ctx.started)
    upstream = timings.get("upstream", 0.0)
    response = ctx.response
    usage = response.usage if response is not None else None
    error = ctx.error
    input_tokens = usage.input_tokens if usage else 0
    output_tokens = usage.output_tokens if usage else 0
    return Record(
        id=ctx.request_id,
        time=_iso(ctx.started_wall),
        endpoint=ctx.endpoint,
        format=ctx.client_format,
        status=ctx.status,
        model=ctx.requested_model,
        caller=ctx.caller,
        route=ctx.route,
        provider=ctx.provider,
        provider_model=ctx.model,
        tags=list(ctx.tags),
        classifier_errors=dict(ctx.classifier_errors),
        plugins=dict(ctx.plugin_actions),
        attempts=list(ctx.attempts),
        stream=ctx.stream,
        chunks=ctx.stream_chunks,
        failed_at_chunk=ctx.failed_at_chunk,
        error=ErrorInfo(type=error.type or "error", message=error.message, stage=error.stage,
                        plugin=error.plugin) if error else None,
        duration_ms=round(total * 1000, 3),
        ttft_ms=_ms(timings.get("first_token")),
        upstream_ms=round(upstream * 1000, 3),
        overhead_ms=round(max(total - upstream, 0.0) * 1000, 3),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=round(ctx.cost, 8),
        cache_hit=ctx.scratch.get("cache") == "hit",
        finish_reason=response.finish_reason if response is not None and not error else None,
        request=_body(ctx.request, bodies, limit),
        response=_body(response, bodies, limit),
    )


def rejected_record(request_id: str, endpoint: str, client_format: str, status: int,
                    error: ErrorInfo, started_wall: float, duration: float) -> Record:
    """The record of a request that failed before it could be decoded."""
    return Record(id=request_id, time=_iso(started_wall), endpoint=endpoint,
                  format=client_format, status=status, error=error,
                  duration_ms=round(duration * 1000, 3),
                  overhead_ms=round(duration * 1000, 3))
