"""The single-process request series beside prometheus-client's own objects: one interface,
the same exposition; and the token figures read without prometheus-client's test helper."""

from __future__ import annotations

import ast
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

import proxy
from proxy.metrics import FETCH_OUTCOMES, Metrics, TokenFigures
from proxy.request_series import (
    DURATION_BUCKETS,
    LibrarySeries,
    LocalSeries,
    RequestKey,
    RequestSeries,
)

# Label values as clients and configurations can make them: quotes, backslashes, a newline,
# braces and commas, unicode, nothing at all.
ODD_ROUTES = [
    "/",
    "/data/wow",
    'a "quoted" route',
    "back\\slash",
    "new\nline",
    "{x=1,y}",
    "ünï/路径",
    "",
]
ODD_CLIENTS = ["-", "team a", 'quote"client', "\\", "équipe"]
# Every bucket edge, and the floats just below and just above it; zero, tiny, huge, infinite.
EDGES = [
    *DURATION_BUCKETS,
    *(math.nextafter(bound, 0.0) for bound in DURATION_BUCKETS),
    *(math.nextafter(bound, math.inf) for bound in DURATION_BUCKETS),
    0.0,
    -0.0,
    5e-324,
    1e-9,
    1e9,
    math.inf,
]


def _observe(series: RequestSeries) -> None:
    """The same observations, in the same order, through the interface alone."""
    for index, seconds in enumerate(EDGES):
        route = ODD_ROUTES[index % len(ODD_ROUTES)]
        key: RequestKey = (
            route,
            ("GET", "POST", "OTHER")[index % 3],
            (200, 404, 503, 599)[index % 4],
            ODD_CLIENTS[index % len(ODD_CLIENTS)],
        )
        counter, duration = series.request(key)
        counter.inc()
        duration.observe(seconds)
        series.upstream(route).observe(seconds / 2)
    for route in ODD_ROUTES:  # a route seen again: the same children
        series.request((route, "GET", 200, "-"))[0].inc()
        series.upstream(route).observe(0.25)
    for _ in range(3):
        series.started()
    series.finished()


_CREATED_LINE = re.compile(r"^(\w+_created(?:\{.*\})?) (\S+)$", re.MULTILINE)


def _exposition(
    make: Callable[[CollectorRegistry], RequestSeries],
    render: Callable[[CollectorRegistry], bytes],
) -> str:
    """The exposition of one implementation after _observe, with the _created values (the
    moment each child was made) checked and then masked."""
    registry = CollectorRegistry(auto_describe=True)
    before = time.time()
    _observe(make(registry))
    after = time.time()
    text = render(registry).decode()

    def mask(match: re.Match[str]) -> str:
        assert before <= float(match.group(2)) <= after, match.group(0)
        return f"{match.group(1)} <created>"

    masked, created = _CREATED_LINE.subn(mask, text)
    assert created > 0
    return masked


@pytest.mark.parametrize(
    "render", [generate_latest, generate_openmetrics], ids=["text", "openmetrics"]
)
def test_local_series_export_what_prometheus_client_exports(
    render: Callable[[CollectorRegistry], bytes],
) -> None:
    """For the same observations (label values with quotes, backslashes, newlines and
    unicode; durations on, just below and just above every bucket edge, zero, infinite) the
    single process's plain numbers give the exposition, line for line, that prometheus-client's
    own Counter, Histogram and Gauge give, in both exposition formats."""
    local = _exposition(LocalSeries, render)
    library = _exposition(LibrarySeries, render)
    assert local == library
    assert "token_proxy_in_flight_requests 2.0" in local
    assert 'le="+Inf"' in local
    assert '\\"quoted\\"' in local
    assert "new\\nline" in local


def test_proxy_never_reads_metrics_with_the_helper_meant_for_tests() -> None:
    """prometheus-client documents get_sample_value as meant for unit tests; the proxy reads
    its own metrics through the public Collector interface instead."""
    package = Path(proxy.__file__).parent
    users = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if (isinstance(node, ast.Attribute) and node.attr == "get_sample_value")
        or (isinstance(node, ast.Name) and node.id == "get_sample_value")
    ]
    assert users == []


def test_token_figures_are_what_the_token_metrics_hold() -> None:
    """The figures the supervisor sends its workers are its own token metrics of that
    credential (prometheus-client's test helper tells the same), zeros before any fetch."""
    metrics = Metrics()
    assert metrics.token_figures("a") == TokenFigures(fetches={}, expiry=0.0, failures=0.0)
    metrics.token_fetches.labels("a", "error").inc()
    metrics.token_fetches.labels("a", "success").inc(2)
    metrics.token_fetches.labels("b", "rejected").inc()
    metrics.token_expiry.labels("a").set(1_700_000_000.5)
    metrics.token_expiry.labels("b").set(7.0)
    metrics.refresh_failures.labels("a").set(1)
    figures = metrics.token_figures("a")
    assert figures == TokenFigures(
        fetches={"success": 2.0, "error": 1.0}, expiry=1_700_000_000.5, failures=1.0
    )
    assert list(figures.fetches) == [o for o in FETCH_OUTCOMES if o in figures.fetches]
    value = metrics.registry.get_sample_value
    for outcome, count in figures.fetches.items():
        labels = {"credential": "a", "outcome": outcome}
        assert value("token_proxy_token_fetches_total", labels) == count
    assert (
        value("token_proxy_token_expiry_timestamp_seconds", {"credential": "a"}) == 1_700_000_000.5
    )
    assert metrics.token_figures("b") == TokenFigures(
        fetches={"rejected": 1.0}, expiry=7.0, failures=0.0
    )
