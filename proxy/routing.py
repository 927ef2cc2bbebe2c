"""Turning the requested model, the tags and a plugin's choice into the targets to try.

Route rules (first match wins) pick a model group; the group's strategy orders its
targets; targets cooling down after repeated failures are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import random
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from itertools import accumulate
from typing import Any

import msgspec

from proxy.config import Config, ModelConfig, RouteConfig
from proxy.context import RequestContext
from proxy.errors import ProxyError, UpstreamError
from proxy.store import Store, StoreUnavailable

# Statuses worth another try: the provider is busy or broken, not the request.
TRANSIENT = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_CONTEXT_HINTS = ("context length", "context_length", "context window", "prompt is too long",
                  "maximum context", "too many tokens", "reduce the length")
LATENCY_ALPHA = 0.3
# With a shared store: seconds between two readings of what the other workers learned
# (cooldowns, latencies), and between two writes of a target's latency.
SHARED_REFRESH = 0.5
SHARED_LATENCY_WRITE = 1.0


class Target(msgspec.Struct, frozen=True):
    provider: str
    model: str
    weight: float = 1.0
    input_price: float = 0.0
    output_price: float = 0.0
    context: int = 0
    cache_read_price: float | None = None
    cache_write_price: float | None = None

    @property
    def prices(self) -> tuple[float, float, float, float]:
        """Per million tokens: input, output, cache read, cache write."""
        read, write = self.cache_read_price, self.cache_write_price
        return (self.input_price, self.output_price,
                self.input_price if read is None else read,
                self.input_price if write is None else write)


def is_transient(error: UpstreamError) -> bool:
    """Connection errors and timeouts (no upstream status) and busy/broken statuses."""
    return error.upstream_status == 0 or error.upstream_status in TRANSIENT


def is_context_length(error: UpstreamError) -> bool:
    message = error.message.lower()
    return 400 <= error.upstream_status < 500 and any(h in message for h in _CONTEXT_HINTS)


def refused_by(ctx: RequestContext, provider: str, model: str, group: str | None = None
               ) -> str | None:
    """Who, of those that narrowed the models this request may reach
    (``ctx.allow_models``: the caller's key), refuses the target ``provider``/``model``;
    None when every list allows it. This is the one place that decides which target a key
    may reach. The target that answers is judged, never only the name asked for: a glob
    matches the target's model name or ``provider/model``; a list that names a model
    group exactly (no wildcard) also allows that group's own targets, given as ``group``
    when the target is one of them."""
    for owner, patterns in ctx.model_allow_lists:
        if not allows(patterns, provider, model, group):
            return owner
    return None


def allows(patterns: Sequence[str], provider: str, model: str, group: str | None = None
           ) -> bool:
    """Whether one allow-list (a key's ``models``) lets the target ``provider``/``model``
    answer, as ``refused_by`` judges it."""
    qualified = f"{provider}/{model}"
    return any(fnmatch.fnmatchcase(model, p) or fnmatch.fnmatchcase(qualified, p)
               or p == group for p in patterns)


class _Health:
    """What the router remembers of one target."""

    __slots__ = ("cooling_until", "failures", "latency")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.cooling_until = 0.0
        self.latency: float | None = None


class Router:
    """Chooses targets, and learns from their failures and latencies. With a shared store
    (Redis), what one worker learns — a target cooling down, failures counted towards
    one, a latency average — is written there, off the request path, and read back by
    every worker at most every ``SHARED_REFRESH`` seconds: no request waits on it."""

    def __init__(self, config: Config, providers: set[str], skipped: dict[str, str],
                 store: Store | None = None) -> None:
        self.providers = providers
        self.skipped = skipped
        self.routing = config.routing
        self.routes: list[RouteConfig] = config.routes
        self.groups: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.targets = {
            m.name: [Target(t.provider, t.model, t.weight, t.input_price, t.output_price,
                            t.context, t.cache_read_price, t.cache_write_price)
                     for t in m.targets]
            for m in config.models
        }
        self.health: dict[Target, _Health] = {}
        self._turns: dict[str, int] = {}
        self.rng = random.Random(config.routing.seed)
        self.clock = time.monotonic
        # Only the configured targets are shared: a name a client makes up never becomes
        # a key in the store.
        self.store = store if store is not None and store.shared else None
        self._shared = {t: f"route:{t.provider}/{t.model}"
                        for group in self.targets.values() for t in group}
        self._refreshed = float("-inf")
        self._latency_written: dict[Target, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def model_names(self, allowed: Sequence[str] | None = None) -> list[str]:
        """The model names that at least one available provider can serve; with
        ``allowed`` (a key's ``models``), only those with such a target that the list lets
        answer (a group is usable by a key only for its allowed targets)."""
        return [name for name, targets in self.targets.items()
                if any(t.provider in self.providers and
                       (allowed is None or allows(allowed, t.provider, t.model, name))
                       for t in targets)]

    def owner(self, name: str) -> str:
        return self.targets[name][0].provider

    # --- choosing -----------------------------------------------------------------------

    def match_route(self, ctx: RequestContext) -> RouteConfig | None:
        every = set(ctx.tags)
        # Without the tags that only classifiers with the request's own settings gave.
        trusted = every - ctx.client_tags
        for route in self.routes:
            tags = every if route.allow_client_tags else trusted
            if route.tags_all and not tags.issuperset(route.tags_all):
                continue
            if route.tags_any and not tags.intersection(route.tags_any):
                continue
            if route.model and not fnmatch.fnmatchcase(ctx.request_fields.model, route.model):
                continue
            if route.caller and not fnmatch.fnmatchcase(ctx.caller or "", route.caller):
                continue
            return route
        return None

    def route_targets(self, ctx: RequestContext) -> list[Target]:
        """The targets to try, in order. A plugin's ``force_provider``/``force_model`` win,
        then the first matching route rule, then the requested name: a [[models]] name or
        ``provider/model``."""
        if ctx.force_model:
            name = ctx.force_model
        else:
            route = self.match_route(ctx)
            name = route.to if route is not None else ctx.request_fields.model
            if route is not None:
                ctx.route = route.to
        ctx.model_group = name
        if ctx.force_provider:
            group = self.targets.get(name)
            model = group[0].model if group else name
            found = [Target(ctx.force_provider, model)]
        elif name in self.targets:
            found = self._ordered(name, self.targets[name])
        else:
            provider, slash, model = name.partition("/")
            if not (slash and (provider in self.providers or provider in self.skipped)):
                raise ProxyError(404, f"The model `{name}` does not exist on this proxy "
                                      f"(known: {', '.join(self.model_names()) or 'none'})",
                                 code="model_not_found", stage="route")
            found = [Target(provider, model)]
        if ctx.model_allow_lists:
            found = self._allowed(ctx, name, found)
        usable = [t for t in found if t.provider in self.providers]
        if not usable:
            provider = found[0].provider
            why = self.skipped.get(provider, "it is not configured")
            raise ProxyError(404, f"The model `{name}` needs provider `{provider}`, which is "
                                  f"not available: {why}", code="model_not_found", stage="route")
        now = self.clock()
        if self.store is not None and now >= self._refreshed + SHARED_REFRESH:
            self._refreshed = now
            self._spawn(self._refresh())
        ready = [t for t in usable if self._health(t).cooling_until <= now]
        if not ready:
            wait = min(self._health(t).cooling_until for t in usable) - now
            raise ProxyError(
                503, f"Every target for model `{name}` is cooling down after repeated "
                     f"failures; retry in {wait:.0f}s", code="all_targets_cooling_down",
                stage="route", headers={"retry-after": str(max(1, round(wait)))})
        return ready

    def _allowed(self, ctx: RequestContext, name: str, found: list[Target]) -> list[Target]:
        """The targets the request's allow-lists let answer it (route rules, groups,
        fallbacks and forced providers included); a 403 naming the model if none."""
        members = {(t.provider, t.model) for t in self.targets.get(name, ())}
        allowed = []
        refused: tuple[str, Target] | None = None
        for target in found:
            group = name if (target.provider, target.model) in members else None
            owner = refused_by(ctx, target.provider, target.model, group)
            if owner is None:
                allowed.append(target)
            elif refused is None:
                refused = (owner, target)
        if not allowed:
            assert refused is not None
            owner, target = refused
            asked = ctx.request_fields.model
            answers = "" if target.model == asked else f", which would answer '{asked}'"
            raise ProxyError(403, f"{owner[:1].upper()}{owner[1:]} may not use model "
                                  f"'{target.model}'{answers}", code="model_not_allowed",
                             stage="route")
        return allowed

    def _ordered(self, name: str, targets: list[Target]) -> list[Target]:
        strategy = self.groups[name].strategy
        if strategy == "round_robin":
            turn = self._turns.get(name, 0)
            self._turns[name] = turn + 1
            start = turn % len(targets)
            return targets[start:] + targets[:start]
        if strategy == "weighted":
            return self._weighted_order(targets)
        if strategy == "least_latency":
            # Targets never measured go first, so that each is measured once.
            return sorted(targets, key=lambda t: self._health(t).latency or 0.0)
        if strategy == "cheapest":
            return sorted(targets, key=lambda t: t.input_price + t.output_price)
        return list(targets)

    def _weighted_order(self, targets: list[Target]) -> list[Target]:
        """A weighted random order: the first by weight, then the rest the same way."""
        remaining = list(targets)
        ordered: list[Target] = []
        while remaining:
            cumulative = list(accumulate(t.weight for t in remaining))
            pick = self.rng.random() * cumulative[-1]
            index = next(i for i, edge in enumerate(cumulative) if pick < edge)
            ordered.append(remaining.pop(index))
        return ordered

    # --- learning -----------------------------------------------------------------------

    def _health(self, target: Target) -> _Health:
        health = self.health.get(target)
        if health is None:
            health = self.health[target] = _Health()
        return health

    def cooling(self, target: Target) -> bool:
        return self._health(target).cooling_until > self.clock()

    def record_success(self, target: Target, latency: float) -> None:
        health = self._health(target)
        health.failures.clear()
        health.latency = latency if health.latency is None else (
            LATENCY_ALPHA * latency + (1 - LATENCY_ALPHA) * health.latency)
        key = self._shared.get(target)
        if self.store is not None and key is not None:
            now = self.clock()
            if now >= self._latency_written.get(target, float("-inf")) + \
                    SHARED_LATENCY_WRITE:
                self._latency_written[target] = now
                self._spawn(self.store.set(f"{key}:latency", repr(health.latency).encode(),
                                           3600))

    def record_failure(self, target: Target) -> None:
        health = self._health(target)
        now = self.clock()
        health.failures.append(now)
        while health.failures and health.failures[0] < now - self.routing.cooldown_window:
            health.failures.popleft()
        if len(health.failures) >= self.routing.cooldown_failures:
            health.cooling_until = now + self.routing.cooldown
            health.failures.clear()
        key = self._shared.get(target)
        if self.store is not None and key is not None:
            self._spawn(self._share_failure(target, key))

    # --- sharing what was learned -------------------------------------------------------

    async def _share_failure(self, target: Target, key: str) -> None:
        """Counts the failure where every worker sees it; the one that reaches the
        threshold starts the cooldown for all."""
        assert self.store is not None
        routing = self.routing
        count = await self.store.incr(f"{key}:failures", 1, routing.cooldown_window)
        if count >= routing.cooldown_failures:
            await self.store.incr(f"{key}:failures", -count, routing.cooldown_window)
            until = time.time() + routing.cooldown
            await self.store.set(f"{key}:cooling", repr(until).encode(), routing.cooldown)
            health = self._health(target)
            health.cooling_until = max(health.cooling_until, self.clock() + routing.cooldown)

    async def _refresh(self) -> None:
        """Reads the cooldowns and latencies the other workers wrote."""
        assert self.store is not None
        targets = list(self._shared)
        keys = [f"{self._shared[t]}:{what}" for t in targets for what in ("cooling", "latency")]
        values = await self.store.get_many(keys)
        now, wall = self.clock(), time.time()
        for index, target in enumerate(targets):
            cooling, latency = values[2 * index], values[2 * index + 1]
            health = self._health(target)
            if cooling is not None:
                health.cooling_until = max(health.cooling_until,
                                           now + float(cooling) - wall)
            if latency is not None:
                health.latency = float(latency)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            # The store warned and counted a failure; what is known here still holds.
            with contextlib.suppress(StoreUnavailable):
                await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def backoff(self, retry: int, error: UpstreamError) -> float:
        """Seconds to wait before retry number ``retry`` (0-based) of a target."""
        retry_after = _seconds(error.headers.get("retry-after"))
        if retry_after is not None:
            return min(retry_after, self.routing.retry_after_max)
        delay = min(self.routing.backoff_max, self.routing.backoff * 2 ** retry)
        return delay * (0.5 + self.rng.random() / 2)


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
