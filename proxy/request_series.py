"""The per-request metrics behind one interface, with prometheus-client's objects or without.

A worker's go to prometheus-client's multiprocess files; a single process keeps plain
numbers, exported exactly as prometheus-client's objects export themselves."""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BOUNDS = (*DURATION_BUCKETS, float("inf"))
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
_IN_FLIGHT = ("token_proxy_in_flight_requests", "Requests being served now.")

RequestKey = tuple[str, str, int, str]  # route, method, status, client


class Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Observe(Protocol):
    def observe(self, amount: float) -> None: ...


class RequestSeries(Protocol):
    """Requests by route, method, status and client; request and upstream durations (seconds,
    never negative nor NaN) by route; requests in flight. Each implementation registers the
    same series in `registry` (tests/test_metrics.py compares their expositions)."""

    in_flight: Gauge

    def request(self, key: RequestKey) -> tuple[Inc, Observe]:
        """The request counter and duration histogram of one label set."""
        ...

    def upstream(self, route: str) -> Observe:
        """The upstream duration histogram of one route."""
        ...

    def started(self) -> None: ...

    def finished(self) -> None: ...


class LibrarySeries:
    """prometheus-client's objects: a worker's, whose values go to the multiprocess files
    (prometheus-client must then have been imported with PROMETHEUS_MULTIPROC_DIR set)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(*_REQUESTS, registry=registry)
        buckets = DURATION_BUCKETS
        self._request_duration = Histogram(*_REQUEST_DURATION, buckets=buckets, registry=registry)
        self._upstream_duration = Histogram(*_UPSTREAM_DURATION, buckets=buckets, registry=registry)
        self.in_flight = Gauge(*_IN_FLIGHT, registry=registry, multiprocess_mode="livesum")

    def request(self, key: RequestKey) -> tuple[Inc, Observe]:
        route, method, status, client = key
        counter = self._requests.labels(route, method, str(status), client)
        return counter, self._request_duration.labels(route)

    def upstream(self, route: str) -> Observe:
        return self._upstream_duration.labels(route)

    def started(self) -> None:
        self.in_flight.inc()

    def finished(self) -> None:
        self.in_flight.dec()


class LocalSeries:
    """A single process's: plain numbers updated by the event loop's thread alone, without
    the locks of prometheus-client's objects, read at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._collector = _LocalCollector()
        registry.register(self._collector)
        self.active = 0
        self.in_flight = Gauge(*_IN_FLIGHT, registry=registry)
        self.in_flight.set_function(lambda: self.active)

    def request(self, key: RequestKey) -> tuple[Inc, Observe]:
        collector = self._collector
        return (
            collector.requests.setdefault(key, _LocalCount()),
            collector.request_duration.setdefault(key[0], _LocalHistogram()),
        )

    def upstream(self, route: str) -> Observe:
        return self._collector.upstream_duration.setdefault(route, _LocalHistogram())

    def started(self) -> None:
        self.active += 1

    def finished(self) -> None:
        self.active -= 1


@dataclass(slots=True)
class _LocalCount:
    """A counter's value for one label set."""

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
class _LocalCollector(Collector):
    """LocalSeries' numbers exported as prometheus-client exports its own Counter and
    Histogram (same names, samples and _created series)."""

    requests: dict[RequestKey, _LocalCount] = field(default_factory=dict)
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
