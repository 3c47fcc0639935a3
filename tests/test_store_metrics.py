"""The shared store's metrics: read from the store's state at each scrape (nothing per
request), none with the in-memory store, and charted by the Grafana dashboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics, StoreMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"
NAMES = ("token_proxy_store_up", "token_proxy_store_errors_total", "token_proxy_store_replicas")


def scrape(state: dict[str, Any] | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics = Metrics()
    metrics.include(StoreMetrics(lambda: state))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name.startswith("token_proxy_store")
    }


def test_the_store_metrics_say_shared_or_alone_errors_by_kind_and_replicas() -> None:
    shared = {"backend": "redis", "state": "shared", "replicas": 3, "errors": {}}
    assert scrape(shared)[("token_proxy_store_up", ())] == 1.0
    assert scrape(shared)[("token_proxy_store_replicas", ())] == 3.0
    assert scrape(shared)[("token_proxy_store_errors_total", (("kind", "timeout"),))] == 0.0
    alone = {**shared, "state": "alone", "errors": {"timeout": 4, "connection": 1}}
    samples = scrape(alone)
    assert samples[("token_proxy_store_up", ())] == 0.0
    assert samples[("token_proxy_store_errors_total", (("kind", "timeout"),))] == 4.0
    assert samples[("token_proxy_store_errors_total", (("kind", "connection"),))] == 1.0
    kinds = {labels[0][1] for name, labels in samples if name.endswith("errors_total")}
    assert kinds == {"timeout", "connection", "auth", "response", "other"}


def test_no_store_metrics_without_a_shared_store() -> None:
    assert scrape({"backend": "memory"}) == {}
    assert scrape(None) == {}  # before the runtime exists


def test_the_dashboard_charts_the_store_metrics() -> None:
    exprs = json.dumps(json.loads(DASHBOARD.read_text())["panels"])
    for name in NAMES:
        assert name in exprs
