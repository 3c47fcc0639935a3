"""The Prometheus metric objects of one proxy, in a registry of their own. With several
workers, each worker's objects live in prometheus-client's multiprocess files and /-/metrics
adds up every worker's, plus the token metrics the supervisor sends along with its tokens."""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BOUNDS = (*_DURATION_BUCKETS, float("inf"))
# prometheus-client's switch for the _created series, which its own objects obey.
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in {
    "true",
    "1",
    "t",
}
_LE = tuple(floatToGoString(bound) for bound in _BOUNDS)  # type: ignore[no-untyped-call]  # unannotated upstream
_REQUESTS = (
    "token_proxy_requests",
    "Requests answered, by route prefix, method, status and team client.",
    ["route", "method", "status", "client"],
)
_REQUEST_DURATION = (
    "token_proxy_request_duration_seconds",
    "Time from request received to response finished, by route prefix.",
    ["route"],
)
_UPSTREAM_DURATION = (
    "token_proxy_upstream_duration_seconds",
    "Time from sending upstream to upstream response headers, by route prefix.",
    ["route"],
)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
FETCH_OUTCOMES = ("success", "error", "rejected")
_FETCHES = (
    "token_proxy_token_fetches",
    "Token requests made, by credential and outcome (success, error, rejected).",
)
_EXPIRY = (
    "token_proxy_token_expiry_timestamp_seconds",
    "Unix time at which the current token expires (0 when there is none).",
)
_EXPIRES_IN = (
    "token_proxy_token_expires_in_seconds",
    "Seconds until the current token expires (0 when there is none).",
)
_FAILURES = (
    "token_proxy_token_refresh_failures_consecutive",
    "Token requests that failed in a row, by credential.",
)


class Metrics:
    """Every metric token-proxy exports; label values are route prefixes, never raw paths."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        """`multiprocess_dir`: a worker's; prometheus-client must have been imported with
        PROMETHEUS_MULTIPROC_DIR naming it, so that every value goes to its files."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The per-request metrics: prometheus-client's objects in a worker, whose values
        # must go to the shared files; plain numbers without locks in a single process.
        self._request_children: dict[tuple[str, str, int, str], tuple[_Inc, _Observe]] = {}
        self._upstream_children: dict[str, _Observe] = {}
        if multiprocess_dir is not None:
            requests = Counter(*_REQUESTS, registry=r)
            request_duration = Histogram(*_REQUEST_DURATION, buckets=_DURATION_BUCKETS, registry=r)
            upstream_duration = Histogram(
                *_UPSTREAM_DURATION, buckets=_DURATION_BUCKETS, registry=r
            )
            self._request_child: Callable[[tuple[str, str, int, str]], tuple[_Inc, _Observe]] = (
                lambda key: (
                    requests.labels(key[0], key[1], str(key[2]), key[3]),
                    request_duration.labels(key[0]),
                )
            )
            self._upstream_child: Callable[[str], _Observe] = upstream_duration.labels
        else:
            local = _LocalRequestMetrics()
            r.register(local)
            self._request_child = lambda key: (
                local.requests.setdefault(key, _LocalCount()),
                local.request_duration.setdefault(key[0], _LocalHistogram()),
            )
            self._upstream_child = lambda route: local.upstream_duration.setdefault(
                route, _LocalHistogram()
            )
        self.in_flight = Gauge(
            "token_proxy_in_flight_requests",
            "Requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # One process counts its requests in a plain int, read at scrape time: two locked
        # updates fewer per request. A worker's gauge lives in the shared files instead.
        self._active = 0
        self._multiprocess = multiprocess_dir is not None
        if not self._multiprocess:
            self.in_flight.set_function(lambda: self._active)
        self.token_fetches = Counter(*_FETCHES, ["credential", "outcome"], registry=r)
        self.token_expiry = Gauge(*_EXPIRY, ["credential"], registry=r)
        self.token_expires_in = Gauge(*_EXPIRES_IN, ["credential"], registry=r)
        self.refresh_failures = Gauge(*_FAILURES, ["credential"], registry=r)
        self.replays = Counter(
            "token_proxy_upstream_401_replays",
            "Requests replayed with a new token after upstream answered 401.",
            ["route"],
            registry=r,
        )

        self.rate_limited = Counter(
            "token_proxy_rate_limited",
            "Requests refused for a rate limit, by credential and by the limit that refused: "
            "credential, client, or upstream (its own 429 answers).",
            ["credential", "limit"],
            registry=r,
        )

        self._cache_results = Counter(
            "token_proxy_cache_requests",
            "Requests on routes with the response cache, by route prefix and what the cache "
            "did (its X-Cache): HIT, REVALIDATED, MISS or BYPASS.",
            ["route", "result"],
            registry=r,
        )
        self._cache_children: dict[tuple[str, str], _Inc] = {}
        self._cache_evictions = Counter(
            "token_proxy_cache_evictions",
            "Stored answers evicted to keep the response cache within cache_max_bytes.",
            registry=r,
        )
        self._cache_bytes = Gauge(
            "token_proxy_cache_bytes",
            "Bytes the response cache holds (bodies, header fields and keys).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._cache_entries = Gauge(
            "token_proxy_cache_entries",
            "Answers the response cache holds.",
            registry=r,
            multiprocess_mode="livesum",
        )

        # With workers, the exposition adds up every worker's files instead.
        self._exposed = r
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]  # unannotated upstream

    def request_started(self) -> None:
        if self._multiprocess:
            self.in_flight.inc()
        else:
            self._active += 1

    def request_finished(self) -> None:
        if self._multiprocess:
            self.in_flight.dec()
        else:
            self._active -= 1

    def observe_request(
        self, *, route: str, method: str, status: int, client: str, seconds: float
    ) -> None:
        # Label lookups cost more than the updates themselves: children are kept per label set.
        key = (route, method, status, client)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = self._request_child(key)
        children[0].inc()
        children[1].observe(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self._upstream_child(route)
        child.observe(seconds)

    def cache_result(self, route: str, result: str) -> None:
        key = (route, result)
        child = self._cache_children.get(key)
        if child is None:
            child = self._cache_children[key] = self._cache_results.labels(route, result)
        child.inc()

    def cache_evicted(self, count: int) -> None:
        self._cache_evictions.inc(count)

    def cache_size(self, *, entries: int, held: int) -> None:
        self._cache_entries.set(entries)
        self._cache_bytes.set(held)

    def include(self, collector: Collector) -> None:
        """Export metrics kept elsewhere too (a worker: the supervisor's token metrics)."""
        self._exposed.register(collector)

    def render(self) -> bytes:
        return generate_latest(self._exposed)

    def token_figures(self, credential: str) -> TokenFigures:
        """This process's token metrics of one credential, to send to the workers."""
        value = self.registry.get_sample_value
        labels = {"credential": credential}
        fetches = {
            outcome: count
            for outcome in FETCH_OUTCOMES
            if (count := value(_FETCHES[0] + "_total", {**labels, "outcome": outcome})) is not None
        }
        return TokenFigures(
            fetches=fetches,
            expiry=value(_EXPIRY[0], labels) or 0.0,
            failures=value(_FAILURES[0], labels) or 0.0,
        )

    @staticmethod
    def method_label(method: str) -> str:
        return method if method in KNOWN_METHODS else "OTHER"


@dataclass(frozen=True, slots=True)
class TokenFigures:
    """One credential's token metrics, as the supervisor's registry holds them."""

    fetches: Mapping[str, float]
    expiry: float
    failures: float


class TokenMetricsCopy(Collector):
    """A worker's export of the supervisor's token metrics: the supervisor alone fetches
    tokens, so no worker counts them. `figures` gives each credential's latest figures and
    the seconds its token has left, read at every scrape."""

    def __init__(self, figures: Callable[[], Mapping[str, tuple[TokenFigures, float]]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(*_FETCHES, labels=["credential", "outcome"])
        expiry = GaugeMetricFamily(*_EXPIRY, labels=["credential"])
        expires_in = GaugeMetricFamily(*_EXPIRES_IN, labels=["credential"])
        failures = GaugeMetricFamily(*_FAILURES, labels=["credential"])
        for name, (figures, seconds_left) in sorted(self._figures().items()):
            for outcome, count in figures.fetches.items():
                fetches.add_metric([name, outcome], count)
            expiry.add_metric([name], figures.expiry)
            expires_in.add_metric([name], seconds_left)
            failures.add_metric([name], figures.failures)
        yield from (fetches, expiry, expires_in, failures)


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Observe(Protocol):
    def observe(self, amount: float) -> None: ...


@dataclass(slots=True)
class _LocalCount:
    """A counter's value for one label set, updated by the one event loop thread only."""

    value: float = 0.0
    created: float = field(default_factory=time.time)

    def inc(self, amount: float = 1) -> None:
        self.value += amount


@dataclass(slots=True)
class _LocalHistogram:
    """A histogram's counts per bucket (not yet cumulative) and sum for one label set."""

    counts: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS))
    sum: float = 0.0
    created: float = field(default_factory=time.time)

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(_BOUNDS, amount)] += 1  # the first bound >= amount: `le`


@dataclass(slots=True, eq=False)  # a registry keys its collectors by identity
class _LocalRequestMetrics(Collector):
    """The per-request metrics of a single process, exported as prometheus-client exports
    its own Counter and Histogram (same names, samples and _created series)."""

    requests: dict[tuple[str, str, int, str], _LocalCount] = field(default_factory=dict)
    request_duration: dict[str, _LocalHistogram] = field(default_factory=dict)
    upstream_duration: dict[str, _LocalHistogram] = field(default_factory=dict)

    def collect(self) -> Iterator[Metric]:
        name, documentation, labels = _REQUESTS
        requests = CounterMetricFamily(name, documentation, labels=labels)
        for (route, method, status, client), count in list(self.requests.items()):
            requests.add_metric(
                [route, method, str(status), client],
                count.value,
                created=count.created if _CREATED else None,
            )
        yield requests
        yield _histogram(_REQUEST_DURATION, self.request_duration)
        yield _histogram(_UPSTREAM_DURATION, self.upstream_duration)


def _histogram(
    meta: tuple[str, str, list[str]], children: dict[str, _LocalHistogram]
) -> HistogramMetricFamily:
    name, documentation, labels = meta
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for route, child in list(children.items()):
        cumulative, buckets = 0, []
        for le, count in zip(_LE, child.counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric([route], buckets, child.sum)
        if _CREATED:
            family.samples.append(Sample(f"{name}_created", {"route": route}, child.created))
    return family
