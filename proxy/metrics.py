"""The Prometheus metric objects of one proxy, in a registry of their own. With several
workers, each worker's objects live in prometheus-client's multiprocess files and /-/metrics
adds up every worker's, plus the token metrics the supervisor sends along with its tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
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
        self.requests = Counter(
            "token_proxy_requests",
            "Requests answered, by route prefix, method, status and team client.",
            ["route", "method", "status", "client"],
            registry=r,
        )
        self.request_duration = Histogram(
            "token_proxy_request_duration_seconds",
            "Time from request received to response finished, by route prefix.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "token_proxy_upstream_duration_seconds",
            "Time from sending upstream to upstream response headers, by route prefix.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
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
            "Requests refused for a rate limit, upstream's 429 included, by credential.",
            ["credential"],
            registry=r,
        )

        # Label lookups cost more than the updates themselves: children are kept per label set.
        self._request_children: dict[tuple[str, str, int, str], tuple[Counter, Histogram]] = {}
        self._upstream_children: dict[str, Histogram] = {}

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
        key = (route, method, status, client)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status), client),
                self.request_duration.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_duration.labels(route)
        child.observe(seconds)

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
