"""The Prometheus metrics of one proxy, in a registry of their own, and their exposition.

With several workers, each worker's objects live in prometheus-client's multiprocess files
and /-/metrics adds up every worker's, plus the token metrics the supervisor sends along
with its tokens."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from proxy.request_series import (
    Inc,
    LibrarySeries,
    LocalSeries,
    Observe,
    RequestKey,
    RequestSeries,
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
_RELOADS = (
    "token_proxy_config_reloads",
    "Reloads of the configuration (SIGHUP) and of the secret files, by outcome.",
)
_LAST_RELOAD_SUCCESS = (
    "token_proxy_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful reload (of the start, before any).",
)
_LAST_RELOAD_OK = (
    "token_proxy_config_last_reload_successful",
    "1 when the last reload was applied, 0 when it was refused and the running one stayed.",
)


class Metrics:
    """Every metric token-proxy exports; label values are route prefixes, never raw paths."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        """`multiprocess_dir`: a worker's; prometheus-client must have been imported with
        PROMETHEUS_MULTIPROC_DIR naming it, so that every value goes to its files."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # A worker's per-request values must go to the shared files: prometheus-client's
        # objects. One process keeps plain numbers without locks: two locked updates fewer
        # per request, and the same exposition.
        series: RequestSeries = LocalSeries(r) if multiprocess_dir is None else LibrarySeries(r)
        self._series = series
        self.in_flight = series.in_flight
        # The calls of every request go straight to the series, without a call of our own.
        self.request_started: Callable[[], None] = series.started
        self.request_finished: Callable[[], None] = series.finished
        self._request_children: dict[RequestKey, tuple[Inc, Observe]] = {}
        self._upstream_children: dict[str, Observe] = {}
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
        self._cache_children: dict[tuple[str, str], Inc] = {}
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
        # Plain numbers, not in the workers' files: each worker exports its supervisor's.
        self.reloads = ConfigReloads()
        self._exposed.register(self.reloads)

    def observe_request(
        self, *, route: str, method: str, status: int, client: str, seconds: float
    ) -> None:
        # Label lookups cost more than the updates themselves: children are kept per label set.
        key = (route, method, status, client)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = self._series.request(key)
        children[0].inc()
        children[1].observe(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self._series.upstream(route)
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
        fetches = {
            sample.labels["outcome"]: sample.value
            for sample in _samples(self.token_fetches, _FETCHES[0] + "_total", credential)
        }
        return TokenFigures(
            fetches={outcome: fetches[outcome] for outcome in FETCH_OUTCOMES if outcome in fetches},
            expiry=next(_values(self.token_expiry, _EXPIRY[0], credential), 0.0),
            failures=next(_values(self.refresh_failures, _FAILURES[0], credential), 0.0),
        )

    def forget_credential(self, credential: str) -> None:
        """A credential a reload removed: its token gauges go (its counters stay, totals)."""
        for gauge in (self.token_expiry, self.token_expires_in, self.refresh_failures):
            with contextlib.suppress(KeyError):
                gauge.remove(credential)

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


STORE_ERROR_KINDS = ("timeout", "connection", "auth", "response", "other")


class StoreMetrics(Collector):
    """The shared store's figures, read from `state` (what the store's state() says) at each
    scrape, so that requests pay nothing for them; none with the in-memory store."""

    def __init__(self, state: Callable[[], Mapping[str, Any] | None]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        if state is None or state.get("backend") == "memory" or "state" not in state:
            return
        up = GaugeMetricFamily(
            "token_proxy_store_up",
            "1 while this process shares its state through the store (Redis), 0 while it goes "
            "on alone because the store does not answer.",
        )
        up.add_metric([], 1.0 if state["state"] == "shared" else 0.0)
        errors = CounterMetricFamily(
            "token_proxy_store_errors",
            "Calls to the store (Redis) that failed, by kind: timeout, connection, auth, "
            "response, other.",
            labels=["kind"],
        )
        counted: Mapping[str, int] = state.get("errors") or {}
        for kind in (*STORE_ERROR_KINDS, *sorted(set(counted) - set(STORE_ERROR_KINDS))):
            errors.add_metric([kind], float(counted.get(kind, 0)))
        replicas = GaugeMetricFamily(
            "token_proxy_store_replicas",
            "Processes (replicas and workers) that shared the store when it last answered, "
            "this one included; alone, each rate limit is divided by it.",
        )
        replicas.add_metric([], float(state.get("replicas") or 1))
        yield from (up, errors, replicas)


@dataclass(slots=True, eq=False)  # a registry keys its collectors by identity
class ConfigReloads(Collector):
    """How reloads went, under the names Prometheus gives its own: the load at start counts
    as a success (no reload yet), as it does there."""

    success: float = 0.0
    failure: float = 0.0
    last_success: float = field(default_factory=time.time)
    last_ok: bool = True

    def record(self, *, ok: bool) -> None:
        if ok:
            self.success += 1
            self.last_success = time.time()
        else:
            self.failure += 1
        self.last_ok = ok

    def figures(self) -> dict[str, float]:
        """What a supervisor sends its workers, for `copy`."""
        return {
            "success": self.success,
            "failure": self.failure,
            "last_success": self.last_success,
            "last_ok": float(self.last_ok),
        }

    def copy(self, figures: Mapping[str, float]) -> None:
        self.success = float(figures["success"])
        self.failure = float(figures["failure"])
        self.last_success = float(figures["last_success"])
        self.last_ok = bool(figures["last_ok"])

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(*_RELOADS, labels=["outcome"])
        reloads.add_metric(["success"], self.success)
        reloads.add_metric(["failure"], self.failure)
        yield reloads
        yield GaugeMetricFamily(*_LAST_RELOAD_SUCCESS, value=self.last_success)
        yield GaugeMetricFamily(*_LAST_RELOAD_OK, value=float(self.last_ok))


def _samples(metric: Counter | Gauge, name: str, credential: str) -> Iterator[Sample]:
    """The samples called `name` of one credential, read through the public Collector
    interface (the registry's get_sample_value is documented as meant for tests)."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels.get("credential") == credential:
                yield sample


def _values(metric: Counter | Gauge, name: str, credential: str) -> Iterator[float]:
    return (sample.value for sample in _samples(metric, name, credential))
