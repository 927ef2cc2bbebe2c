"""Prometheus metrics for ``GET /metrics``, counted from the request records.

The series every request touches are counted in plain Python numbers on the event loop
(``_PlainCounter``, ``_PlainHistogram``) and handed to prometheus-client as its metric
families when /metrics is scraped: its own counters and histograms take a lock and check
their arguments on every call, a few microseconds per request for nothing here.

Under ``serve --workers`` the supervisor names a folder in ``PROMETHEUS_MULTIPROC_DIR``
before the workers start: prometheus-client then keeps every worker's counts in files
there, and whichever worker is scraped answers with the sum of all of them — one set of
series for the whole instance. There, every series is prometheus-client's own, written as
it is counted.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from proxy.record import Record

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The endpoints that get series of their own; a path with an id is counted under its
# template, anything else as ``other``.
ENDPOINTS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/messages",
                       "/v1/messages/count_tokens", "/v1/responses", "/v1/embeddings"})
_TEMPLATES = ("/v1/responses/", "/v1/models/")


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    for prefix in _TEMPLATES:
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What /metrics reads: this process's registry, or every worker's files.
        self.scraped = self.registry
        counter: Any = _PlainCounter
        histogram: Any = _PlainHistogram
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.scraped = CollectorRegistry()
            MultiProcessCollector(self.scraped)
            counter, histogram = Counter, Histogram
        labels = ("model", "provider")
        self.requests = counter("hookproxy_requests", "Requests handled",
                                (*labels, "status"), registry=self.registry)
        self.latency = histogram("hookproxy_request_duration_seconds", "Total request time",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = histogram("hookproxy_time_to_first_chunk_seconds",
                              "Streams: time to the first chunk", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.overhead = histogram("hookproxy_overhead_seconds", "Time the proxy added",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.5), registry=self.registry)
        self.tokens = counter("hookproxy_tokens", "Tokens", (*labels, "direction"),
                              registry=self.registry)
        self.cost = counter("hookproxy_cost", "Cost from the configured prices", labels,
                            registry=self.registry)
        self.upstream_errors = counter("hookproxy_upstream_errors", "Failed provider calls",
                                       ("provider", "status"), registry=self.registry)
        self.endpoints = counter("hookproxy_endpoint_requests", "Requests by API endpoint",
                                 ("endpoint", "status"), registry=self.registry)
        self.budget_warnings = Counter("hookproxy_budget_warnings",
                                       "Budgets a key's spending carried past their warn "
                                       "threshold", ("key", "budget"), registry=self.registry)
        self.store_errors = Counter("hookproxy_store_errors",
                                    "Calls to the shared store that failed or timed out",
                                    ("operation",), registry=self.registry)
        self.log_entries_dropped = Counter(
            "hookproxy_log_entries_dropped", "Log entries dropped because the log queue "
            "was full", registry=self.registry)
        self._cache: dict[tuple[str, str, int], _Children] = {}
        # (endpoint path, status) -> its series; paths are client-chosen, so bounded.
        self._endpoint_cache: dict[tuple[str, int], Any] = {}
        self._models: frozenset[str] = frozenset()
        self._providers: frozenset[str] = frozenset()

    def label_names(self, models: Iterable[str], providers: Iterable[str]) -> None:
        """The model and provider names that get series of their own: the configured ones.
        Anything else a client names is counted as ``other``, so no client can grow the
        number of series (or /metrics) by making names up."""
        self._models = frozenset(models)
        self._providers = frozenset(providers) | {"plugin", "-"}

    def _children(self, model: str, provider: str, status: int) -> _Children:
        # labels() takes a lock and builds keys on every call: look each series up once.
        key = (model, provider, status)
        children = self._cache.get(key)
        if children is None:
            children = self._cache[key] = _Children(
                self.requests.labels(model, provider, str(status)),
                self.latency.labels(model, provider), self.ttft.labels(model, provider),
                self.tokens.labels(model, provider, "input"),
                self.tokens.labels(model, provider, "output"),
                self.cost.labels(model, provider))
        return children

    def _endpoint_child(self, path: str, status: int) -> Any:
        key = (path, status)
        child = self._endpoint_cache.get(key)
        if child is None:
            if len(self._endpoint_cache) >= 1024:
                self._endpoint_cache.clear()
            child = self._endpoint_cache[key] = self.endpoints.labels(endpoint_label(path),
                                                                      str(status))
        return child

    def observe(self, record: Record) -> None:
        model = record.model if record.model in self._models else (
            "-" if not record.model else "other")
        provider = record.provider or "-"
        if provider not in self._providers:
            provider = "other"
        # Statuses are three digits by construction; still, one series per class beyond
        # the ones HTTP defines.
        status = record.status if 100 <= record.status <= 599 else 0
        children = self._children(model, provider, status)
        children.requests.inc()
        self._endpoint_child(record.endpoint, status).inc()
        children.latency.observe(record.duration_ms / 1000)
        self.overhead.observe(record.overhead_ms / 1000)
        if record.ttft_ms is not None:
            children.ttft.observe(record.ttft_ms / 1000)
        if record.input_tokens:
            children.input_tokens.inc(record.input_tokens)
        if record.output_tokens:
            children.output_tokens.inc(record.output_tokens)
        if record.cost:
            children.cost.inc(record.cost)
        if record.limits is not None and record.limits.warnings:
            # Key names come from the config: a bounded set of series.
            for budget in record.limits.warnings:
                self.budget_warnings.labels(record.caller or "-", budget).inc()
        for attempt in record.attempts:
            if attempt.error is not None:
                name = attempt.provider if attempt.provider in self._providers else "other"
                status = attempt.status if 0 <= attempt.status <= 599 else 0
                self.upstream_errors.labels(name, str(status)).inc()

    def store_failed(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    def log_dropped(self) -> None:
        self.log_entries_dropped.inc()

    def render(self) -> bytes:
        return generate_latest(self.scraped)


class _Children(NamedTuple):
    requests: Any
    latency: Any
    ttft: Any
    input_tokens: Any
    output_tokens: Any
    cost: Any


# --- series counted in plain numbers ----------------------------------------------------


class _Count:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Buckets:
    """One histogram series: how many observations fell in each bucket (not cumulative),
    and their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is at least ``amount``, as prometheus-client's.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Plain:
    """A family of series kept on the event loop, handed to prometheus-client (as a custom
    collector of ``registry``) when scraped. Series are made, and listed, as prometheus-
    client's are: on first use of their labels, in that order."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: Any) -> Any:
        key = tuple(map(str, values))
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = self._new()
        return found

    def _new(self) -> Any:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        created = getattr(prometheus_metrics, "_use_created", True)
        for labels, series in list(self.series.items()):
            self._add(family, labels, series, created)
        return [family]

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Any, labels: tuple[str, ...], series: Any, created: bool) -> None:
        raise NotImplementedError


class _PlainCounter(_Plain):
    def _new(self) -> _Count:
        return _Count()

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Any, labels: tuple[str, ...], series: _Count,
             created: bool) -> None:
        family.add_metric(labels, series.value, created=series.created if created else None)


class _PlainHistogram(_Plain):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.bounds = [float(bound) for bound in buckets]
        if self.bounds[-1] != math.inf:
            self.bounds.append(math.inf)
        self.shown = [floatToGoString(bound) for bound in self.bounds]
        super().__init__(name, documentation, labelnames, registry)
        if not self.labelnames:  # one series, there from the start
            self.observe = self.labels().observe

    def _new(self) -> _Buckets:
        return _Buckets(self.bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Any, labels: tuple[str, ...], series: _Buckets,
             created: bool) -> None:
        total = 0.0
        cumulative = []
        for shown, count in zip(self.shown, series.counts, strict=True):
            total += count
            cumulative.append((shown, total))
        family.add_metric(labels, cumulative, series.sum)
        if created:
            family.samples.append(Sample(self.name + "_created",
                                         dict(zip(self.labelnames, labels, strict=True)),
                                         series.created))
