"""The Prometheus metric objects of one proxy, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class Metrics:
    """Every metric token-proxy exports; label values are route prefixes, never raw paths."""

    def __init__(self) -> None:
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
            "token_proxy_in_flight_requests", "Requests being served now.", registry=r
        )
        self.token_fetches = Counter(
            "token_proxy_token_fetches",
            "Token requests made, by credential and outcome (success, error, rejected).",
            ["credential", "outcome"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "token_proxy_token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 when there is none).",
            ["credential"],
            registry=r,
        )
        self.token_expires_in = Gauge(
            "token_proxy_token_expires_in_seconds",
            "Seconds until the current token expires (0 when there is none).",
            ["credential"],
            registry=r,
        )
        self.refresh_failures = Gauge(
            "token_proxy_token_refresh_failures_consecutive",
            "Token requests that failed in a row, by credential.",
            ["credential"],
            registry=r,
        )
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @staticmethod
    def method_label(method: str) -> str:
        return method if method in KNOWN_METHODS else "OTHER"
