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
plugins             plugin -> modified | short_circuit | rejected | failed | timed_out
plugin_errors       plugin -> the message of its first error
annotations         plugin -> {key: value}: what plugins put in the record (``ctx.annotate``),
                    secret-looking keys redacted; annotations_dropped: how many did not fit
attempts            provider calls: provider, model, status (0: no answer), error, latency_ms
stream              streaming or not; chunks: events sent; failed_at_chunk: where it broke
status              HTTP status the client got (499: the client left)
error               type, message, stage, plugin
duration_ms         total time; ttft_ms: time to the first chunk (streams)
upstream_ms         time spent waiting for providers; overhead_ms: the rest
input_tokens, output_tokens, cost   usage, and cost from the configured prices
cache_read_tokens, cache_write_tokens  of the input tokens, those the prompt cache served/took
cache_hit           answered by the response cache
usage_estimated     the tokens (and cost) are hookproxy's estimate: the provider did not
                    report its usage to the end (a stream cut off or broken midway)
limits              what the key's limits held for the request (reserved_tokens,
                    reserved_cost) and charged it (tokens, cost, estimated), the budgets
                    it carried past their warn threshold (warnings), and unchecked when
                    the limits store could not be reached and the request went through
finish_reason       stop | length | tool_calls | content_filter
request, response   bodies, per ``[log].bodies``: none, truncated or full (a large body
                    shows its first and newest messages; ``messages_omitted``,
                    ``truncated_from_bytes``); values under secret-looking keys are
                    ``[redacted]`` at any depth
bodies_dropped      the record would have been this many bytes: over the cap, so it went
                    without its bodies (``[log].max_record_bytes``)
==================  ===========================================================
"""

from __future__ import annotations

import functools
import math
import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from proxy.canonical import Request, Tool, fingerprint
from proxy.context import MAX_ANNOTATION_BYTES, Attempt, RequestContext
from proxy.memo import memo

Bodies = Literal["none", "truncated", "full"]
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
    # plugin -> its first error's message (what failed, and why, beyond "failed")
    plugin_errors: dict[str, str] = {}
    annotations: dict[str, Any] = {}
    annotations_dropped: int = 0
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
    # Of the input tokens: read from / written to the provider's prompt cache.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost: float = 0.0
    cache_hit: bool = False
    usage_estimated: bool = False
    limits: Any = None
    finish_reason: str | None = None
    request: Any = None
    response: Any = None
    # The record would have been this many bytes with its bodies: over [log].max_record_bytes.
    bodies_dropped: int | None = None


def _plugin_errors(ctx: RequestContext) -> dict[str, str]:
    found: dict[str, str] = {}
    for error in ctx.errors:
        if error.plugin and error.plugin not in found:
            found[error.plugin] = _cut(error.message, 1000)
    return found


def _annotations(ctx: RequestContext) -> dict[str, Any]:
    """Plugins' annotations (small: ``MAX_ANNOTATION_BYTES`` at most), with the values
    under secret-looking keys redacted as in the bodies."""
    return {plugin: body_view(values, "full", MAX_ANNOTATION_BYTES, MAX_ANNOTATION_BYTES)
            for plugin, values in ctx.annotations.items()}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# The second _iso last wrote, and how: (whole seconds, "YYYY-MM-DDTHH:MM:SS").
_second: tuple[int, str] = (-1, "")


def _iso(started_wall: float) -> str:
    """``datetime.fromtimestamp(started_wall, UTC).isoformat(timespec="milliseconds")``,
    with the date and time of the second made once per second: building a datetime costs
    more than the rest of the record's plain fields together."""
    global _second
    whole = math.floor(started_wall)
    # Microseconds rounded half to even, as datetime.fromtimestamp does; then cut to ms.
    micros = round((started_wall - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    second = _second
    if second[0] != whole:
        second = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{second[1]}.{micros // 1000:03d}+00:00"


def ms(seconds: float) -> float:
    """``seconds`` in milliseconds, to the microsecond: ``round(seconds * 1000, 3)`` at a
    quarter of its cost (the double nearest n / 1000 prints with at most three decimals)."""
    return round(seconds * 1e6) / 1000


def _cost(cost: float) -> float:
    """``round(cost, 8)``, as ``ms`` does it (a cost no float holds stays as it is)."""
    try:
        return round(cost * 1e8) / 1e8
    except (OverflowError, ValueError):  # inf, nan
        return cost


# Words that make a key's value a secret: ``api_key``, ``x-api-key``, ``auth_token``,
# ``accessToken``, ``password``... but not ``max_tokens`` or ``keywords``.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd",
                           "authorization", "auth", "credential", "credentials", "cookie"})
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# A body shows its first message (an app's standing instruction, usually) and its newest
# ones; what lies between is counted, not copied.
KEEP_NEWEST = 6
# Nodes (values) one body walk visits at most; the rest is cut and counted.
_MAX_NODES = 2000


def body_view(value: Any, bodies: Bodies, limit: int, cap: int, omitted: int = 0) -> Any:
    """A request or response as the record shows it: JSON, at most about ``cap`` bytes,
    with every value under a secret-looking key replaced at any depth.

    ``full`` keeps strings whole; ``truncated`` cuts each at ``limit`` characters. A body
    whose JSON fits in its budget and names nothing secret-looking is embedded as it was
    encoded (one msgspec encode); a larger one becomes a bounded view: the first message and
    the newest ones (``messages_omitted`` counts the rest), at most ``_MAX_NODES`` values
    (and as many again in its tool definitions, whose view is kept in the memo), and
    ``truncated_from_bytes`` the size of what it was cut from. No step walks a whole large
    body key by key in Python. (``omitted``: messages already left out of ``value``.)
    """
    if bodies == "none" or value is None:
        return None
    budget = cap if bodies == "full" else min(cap, limit)
    messages = getattr(value, "messages", None)
    cut = len(messages) - KEEP_NEWEST - 1 if isinstance(messages, list) else 0
    if cut > 0 and isinstance(messages, list):
        # A long history: only its first and newest messages are ever converted.
        value = msgspec.structs.replace(value, messages=[messages[0], *messages[-KEEP_NEWEST:]])
    omitted += max(cut, 0)
    encoded = _encode(value)
    if omitted <= 0 and len(encoded) <= budget:
        if not may_name_secret(encoded):
            return msgspec.Raw(encoded)
        # Small (at most ``budget`` bytes): walked whole, only to replace the secrets.
        return _Walker(len(encoded), max_nodes=len(encoded)).view(msgspec.to_builtins(value))
    limit = limit if bodies == "truncated" else max(cap // 4, limit)
    walker = _Walker(limit)
    tools = getattr(value, "tools", None)
    if tools and isinstance(value, Request):
        # An agent sends the same tool definitions every turn: their view is made once
        # (with a node budget of its own) and kept in the memo by their content.
        view = walker.view(msgspec.to_builtins(msgspec.structs.replace(value, tools=[])))
        key = fingerprint(tools)  # the view kept is about as large as the key
        tools_view, cut = memo.get_or_compute(("record-tools", limit), key,
                                              functools.partial(_tools_view, tools, limit),
                                              2 * len(key))
        view["tools"] = tools_view
        walker.cut = walker.cut or cut
    else:
        view = walker.view(msgspec.to_builtins(value))
    if isinstance(view, dict):
        if omitted > 0:
            view["messages_omitted"] = omitted
        if walker.cut:
            view["truncated_from_bytes"] = len(encoded)
    return view


def _tools_view(tools: list[Tool], limit: int, _key: bytes) -> tuple[Any, bool]:
    walker = _Walker(limit)
    return walker.view(msgspec.to_builtins(tools)), walker.cut


# Anything ``is_secret_key`` could call a secret holds one of these stems, anywhere: a
# body with none of them can be embedded as it was encoded. (A looser test than the keys
# themselves: a false alarm only costs a walk of a small body.) Looked for in text, not
# bytes: ``stem in some_bytes`` first tries the stem as an integer and formats the
# TypeError that says it is not one, several times the cost of the search.
_SECRET_STEMS = ("key", "tok", "secret", "pass", "auth", "cred", "cookie")
# The token counts nearly every body has (max_tokens, input_tokens...). No secret word
# ends in "tokens", so a name ending so is a secret only by a stem before it, which stays.
_COUNT_SUFFIX = b'_tokens"'


def may_name_secret(encoded: bytes) -> bool:
    """Whether JSON ``encoded`` may hold a key ``is_secret_key`` calls a secret: it has
    one of the stems, in any case, outside the ``_tokens"`` ending of a count's name."""
    lowered = encoded.lower().replace(_COUNT_SUFFIX, b'"').decode("latin-1")
    return any(stem in lowered for stem in _SECRET_STEMS)


@functools.lru_cache(maxsize=4096)  # bodies repeat their keys; bounded, whatever comes
def is_secret_key(key: str) -> bool:
    words = _WORD_SPLIT.split(key)
    return any(word.lower() in _SECRET_WORDS for word in words) or \
        key.lower().replace("-", "").replace("_", "") in _SECRET_WORDS


class _Walker:
    """Copies JSON-like data with strings cut at ``limit``, secrets replaced, and at most
    ``max_nodes`` values visited."""

    def __init__(self, limit: int, max_nodes: int = _MAX_NODES) -> None:
        self.limit = limit
        self.max_nodes = max_nodes
        self.nodes = 0
        self.cut = False

    def view(self, value: Any) -> Any:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            self.cut = True
            return "[...]"
        if isinstance(value, dict):
            return {k: ("[redacted]" if isinstance(k, str) and is_secret_key(k)
                        and not isinstance(v, bool | int | float) and v is not None
                        else self.view(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.view(v) for v in value]
        if isinstance(value, str) and len(value) > self.limit:
            self.cut = True
            return value[: self.limit] + f"... [{len(value) - self.limit} more characters]"
        return value


def build_record(ctx: RequestContext, *, bodies: Bodies = "truncated", limit: int = 2000,
                 cap: int = 256 * 1024) -> Record:
    """The request's record; with ``bodies`` other than "none", its bodies too (which is
    the part that costs: the observer builds them on its own thread)."""
    timings = ctx.timings
    total = timings.get("total")
    if total is None:  # not over yet (a record made early)
        total = time.perf_counter() - ctx.started
    upstream = timings.get("upstream", 0.0)
    response = ctx.response
    usage = response.usage if response is not None else None
    error = ctx.error
    input_tokens = usage.input_tokens if usage else 0
    output_tokens = usage.output_tokens if usage else 0
    record = Record(
        id=ctx.request_id,
        time=_iso(ctx.started_wall),
        endpoint=ctx.endpoint,
        format=ctx.client_format,
        status=ctx.status,
        model=_cut(ctx.requested_model, 256),
        provider=ctx.provider,
        provider_model=ctx.model,
        attempts=list(ctx.attempts),
        duration_ms=ms(total),
        upstream_ms=ms(upstream),
        overhead_ms=ms(max(total - upstream, 0.0)),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=_cost(ctx.cost),
        finish_reason=response.finish_reason if response is not None and not error else None,
    )
    # The fields most requests leave at their defaults are set only when they are not:
    # msgspec finds each keyword argument by name, which was most of a record's cost.
    if ctx.caller is not None:
        record.caller = ctx.caller
    if ctx.route is not None:
        record.route = ctx.route
    if ctx.tags:
        record.tags = list(ctx.tags)
    if ctx.classifier_errors:
        record.classifier_errors = dict(ctx.classifier_errors)
    if ctx.plugin_actions:
        record.plugins = dict(ctx.plugin_actions)
    if ctx.errors:
        record.plugin_errors = _plugin_errors(ctx)
    if ctx.annotations:
        record.annotations = _annotations(ctx)
    if ctx.annotations_dropped:
        record.annotations_dropped = ctx.annotations_dropped
    if ctx.stream:
        record.stream = ctx.stream
    if ctx.stream_chunks:
        record.chunks = ctx.stream_chunks
    if ctx.failed_at_chunk is not None:
        record.failed_at_chunk = ctx.failed_at_chunk
    if error is not None:
        record.error = ErrorInfo(type=error.type or "error", message=_cut(error.message, 4000),
                                 stage=error.stage, plugin=error.plugin)
    first_token = timings.get("first_token")
    if first_token is not None:
        record.ttft_ms = ms(first_token)
    if usage:
        record.cache_read_tokens = usage.cache_read_tokens
        record.cache_write_tokens = usage.cache_write_tokens
    if ctx.scratch.get("cache") == "hit":
        record.cache_hit = True
    if ctx.usage_estimated:
        record.usage_estimated = ctx.usage_estimated
    if ctx.limits is not None:
        record.limits = ctx.limits
    if bodies != "none":
        record.request = body_view(ctx.request, bodies, limit, cap)
        record.response = body_view(response, bodies, limit, cap)
    return record


def rejected_record(request_id: str, endpoint: str, client_format: str, status: int,
                    error: ErrorInfo, started_wall: float, duration: float) -> Record:
    """The record of a request that failed before it could be decoded."""
    return Record(id=request_id, time=_iso(started_wall), endpoint=endpoint,
                  format=client_format, status=status, error=error,
                  duration_ms=ms(duration), overhead_ms=ms(duration))
