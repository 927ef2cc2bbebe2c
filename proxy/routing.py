"""Turning the requested model, the tags and a plugin's choice into the targets to try.

Route rules (first match wins) pick a model group; the group's strategy orders its
targets; targets cooling down after repeated failures are left out.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from itertools import accumulate

import msgspec

from proxy.config import Config, ModelConfig, RouteConfig
from proxy.context import RequestContext
from proxy.errors import ProxyError, UpstreamError

# Statuses worth another try: the provider is busy or broken, not the request.
TRANSIENT = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_CONTEXT_HINTS = ("context length", "context_length", "context window", "prompt is too long",
                  "maximum context", "too many tokens", "reduce the length")
LATENCY_ALPHA = 0.3


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


class _Health:
    """What the router remembers of one target."""

    __slots__ = ("cooling_until", "failures", "latency")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.cooling_until = 0.0
        self.latency: float | None = None


class Router:
    def __init__(self, config: Config, providers: set[str], skipped: dict[str, str]) -> None:
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

    def model_names(self) -> list[str]:
        """The model names that at least one available provider can serve."""
        return [name for name, targets in self.targets.items()
                if any(t.provider in self.providers for t in targets)]

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
        usable = [t for t in found if t.provider in self.providers]
        if not usable:
            provider = found[0].provider
            why = self.skipped.get(provider, "it is not configured")
            raise ProxyError(404, f"The model `{name}` needs provider `{provider}`, which is "
                                  f"not available: {why}", code="model_not_found", stage="route")
        now = self.clock()
        ready = [t for t in usable if self._health(t).cooling_until <= now]
        if not ready:
            wait = min(self._health(t).cooling_until for t in usable) - now
            raise ProxyError(
                503, f"Every target for model `{name}` is cooling down after repeated "
                     f"failures; retry in {wait:.0f}s", code="all_targets_cooling_down",
                stage="route", headers={"retry-after": str(max(1, round(wait)))})
        return ready

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

    def record_failure(self, target: Target) -> None:
        health = self._health(target)
        now = self.clock()
        health.failures.append(now)
        while health.failures and health.failures[0] < now - self.routing.cooldown_window:
            health.failures.popleft()
        if len(health.failures) >= self.routing.cooldown_failures:
            health.cooling_until = now + self.routing.cooldown
            health.failures.clear()

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
