"""Observability: the Prometheus metrics of a whole scenario, /-/ready's explanations, request
ids, the access log and its sampling, token lifecycle events, metrics_port, and the Grafana
dashboard that must chart every metric the proxy exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.config import Settings
from proxy.metrics import KNOWN_METHODS, Metrics
from tests.conftest import (
    PROBLEM_JSON,
    TEST_SECRET,
    CapturedLog,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    ProxyProcess,
    StartProcess,
    app_of,
    free_port,
    manager_of,
    wait_for,
)

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
STATE_KEYS = {
    "ready",
    "expires_in",
    "last_error",
    "last_error_description",
    "consecutive_failures",
    "next_retry_in",
}


# --- helpers -----------------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def series(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The samples called `name`, keyed by the values of the labels `keys`, in that order."""
    out: dict[tuple[str, ...], float] = {}
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            by_name = dict(labels)
            out[tuple(by_name[key] for key in keys)] = value
    return out


def value_of(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape(client: Client) -> Samples:
    async with client.get("/-/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return parse_metrics(await response.text())


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def access_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in json_lines(proxy.log_text()) if line.get("logger") == "proxy.access"]


def two_credentials(
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    *,
    b_token_url: str | None = None,
    extra_routes: list[dict[str, str]] | None = None,
) -> Settings:
    """Credentials a and b, routes /a/ and /b/ to the fake upstream (and any extra routes)."""
    return Settings.model_validate(
        {
            "port": 0,
            "credentials": {
                "a": {
                    "client_id": "client-a",
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                },
                "b": {
                    "client_id": "client-b",
                    "client_secret": TEST_SECRET,
                    "token_url": b_token_url or token_server.url,
                },
            },
            "routes": [
                {"prefix": "/a/", "upstream": upstream.url, "credential": "a"},
                {"prefix": "/b/", "upstream": upstream.url, "credential": "b"},
                *(extra_routes or []),
            ],
        }
    )


@pytest.fixture
async def rejecting_token_endpoint() -> AsyncIterator[str]:
    """A token endpoint that rejects every client with invalid_client; yields its URL."""

    async def reject(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "invalid_client", "error_description": "unknown client"}, status=401
        )

    app = web.Application()
    app.router.add_post("/token", reject)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/token"))
    await server.close()


# --- a. metrics of a whole scenario ------------------------------------------------------------


async def test_metrics_of_a_scenario_with_two_routes_and_credentials(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Requests, latencies, token fetches, expiry, refresh failures, 401 replays and upstream 429s
    all show in /-/metrics with exact values and labels bounded by the configuration."""
    closed = f"http://127.0.0.1:{free_port()}"
    settings = two_credentials(
        token_server,
        upstream,
        extra_routes=[{"prefix": "/c/", "upstream": closed, "credential": "b"}],
    )
    first_seen: list[str] = []

    async def reject_first_token(request: web.Request) -> web.Response:
        auth = request.headers["Authorization"]
        if not first_seen:
            first_seen.append(auth)
        if auth == first_seen[0]:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    async def too_many(request: web.Request) -> web.Response:
        return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "1"})

    upstream.handlers["/replay"] = reject_first_token
    upstream.handlers["/limited"] = too_many

    client = await start_proxy(settings)
    tokens = app_of(client).runtime.tokens
    await wait_for(lambda: tokens["a"].state()["ready"] and tokens["b"].state()["ready"], timeout=5)

    # At start: one successful fetch each, nothing failing, tokens valid for an hour.
    first = await scrape(client)
    now = time.time()
    fetches = series(first, "token_proxy_token_fetches_total", "credential", "outcome")
    assert fetches == {("a", "success"): 1.0, ("b", "success"): 1.0}
    assert series(first, "token_proxy_token_refresh_failures_consecutive", "credential") == {
        ("a",): 0.0,
        ("b",): 0.0,
    }
    for name in ("a", "b"):
        expiry = value_of(first, "token_proxy_token_expiry_timestamp_seconds", credential=name)
        assert expiry is not None
        assert now + 3590 < expiry <= now + 3600
        left = value_of(first, "token_proxy_token_expires_in_seconds", credential=name)
        assert left is not None
        assert 3590 < left <= 3600
    # The scrape is itself a request being served while the exposition is rendered.
    assert value_of(first, "token_proxy_in_flight_requests") == 1.0

    async with client.get("/a/ok") as response:
        assert response.status == 200
    async with client.post("/a/ok", data=b"xy") as response:
        assert response.status == 200
    async with client.get("/b/ok") as response:
        assert response.status == 200
    async with client.get("/b/limited") as response:
        assert response.status == 429
    async with client.get("/c/down?q=1") as response:
        assert response.status == 502
    async with client.get("/nowhere/raw-path-1") as response:
        assert response.status == 404
    async with client.request("PROPFIND", "/nowhere/raw-path-2") as response:
        assert response.status == 404
    async with client.get("/-/healthy") as response:
        assert response.status == 200

    # Credential a's next token lives 2 s, so its background refresh comes soon.
    token_server.expires_in = 2
    async with client.get("/a/replay") as response:
        assert response.status == 200
    replay_auth = [r.header("Authorization") for r in upstream.requests if r.raw_path == "/replay"]
    assert len(replay_auth) == 2
    assert replay_auth[0] != replay_auth[1]
    assert len(token_server.issued) == 3

    # The refresh of a fails once; gates hold the token endpoint so the state can be seen.
    token_server.expires_in = 3600
    token_server.script.append(web.json_response({"error": "temporarily_unavailable"}, status=503))
    gate_refresh, gate_retry = asyncio.Event(), asyncio.Event()
    token_server.release = gate_refresh
    short = await scrape(client)
    now = time.time()
    expiry_a = value_of(short, "token_proxy_token_expiry_timestamp_seconds", credential="a")
    assert expiry_a is not None
    assert now < expiry_a <= now + 2.0
    left_a = value_of(short, "token_proxy_token_expires_in_seconds", credential="a")
    assert left_a is not None
    assert 0 < left_a <= 2.0

    await wait_for(lambda: len(token_server.requests) == 4, timeout=5)  # the refresh, held
    token_server.release = gate_retry
    gate_refresh.set()
    await wait_for(lambda: len(token_server.requests) == 5, timeout=5)  # its retry, held
    failing = await scrape(client)
    assert series(failing, "token_proxy_token_refresh_failures_consecutive", "credential") == {
        ("a",): 1.0,
        ("b",): 0.0,
    }
    assert value_of(failing, "token_proxy_token_fetches_total", credential="a", outcome="error")
    gate_retry.set()
    # The retry's token is installed (the 2 s token may still look usable, so "ready" is not
    # enough to tell).
    await wait_for(
        lambda: len(token_server.issued) == 4 and tokens["a"].state()["consecutive_failures"] == 0,
        timeout=5,
    )

    final = await scrape(client)
    now = time.time()
    assert value_of(final, "token_proxy_in_flight_requests") == 1.0
    assert series(final, "token_proxy_requests_total", "route", "method", "status", "client") == {
        ("/a/", "GET", "200", "-"): 2.0,
        ("/a/", "POST", "200", "-"): 1.0,
        ("/b/", "GET", "200", "-"): 1.0,
        ("/b/", "GET", "429", "-"): 1.0,
        ("/c/", "GET", "502", "-"): 1.0,
        ("none", "GET", "404", "-"): 1.0,
        ("none", "OTHER", "404", "-"): 1.0,
        # /-/healthy and the three earlier scrapes; this one is counted once it is rendered.
        ("-", "GET", "200", "-"): 4.0,
    }
    assert series(final, "token_proxy_request_duration_seconds_count", "route") == {
        ("/a/",): 3.0,
        ("/b/",): 2.0,
        ("/c/",): 1.0,
        ("none",): 2.0,
        ("-",): 4.0,
    }
    # One observation per exchange with upstream: the replayed request went there twice, the
    # 502 once (connection refused); requests that never left the proxy are not observed.
    assert series(final, "token_proxy_upstream_duration_seconds_count", "route") == {
        ("/a/",): 4.0,
        ("/b/",): 2.0,
        ("/c/",): 1.0,
    }
    assert series(final, "token_proxy_token_fetches_total", "credential", "outcome") == {
        ("a", "success"): 3.0,
        ("a", "error"): 1.0,
        ("b", "success"): 1.0,
    }
    assert series(final, "token_proxy_token_refresh_failures_consecutive", "credential") == {
        ("a",): 0.0,
        ("b",): 0.0,
    }
    for name in ("a", "b"):
        expiry = value_of(final, "token_proxy_token_expiry_timestamp_seconds", credential=name)
        assert expiry is not None
        assert now + 3580 < expiry <= now + 3600
        left = value_of(final, "token_proxy_token_expires_in_seconds", credential=name)
        assert left is not None
        assert 3580 < left <= 3600
    assert series(final, "token_proxy_upstream_401_replays_total", "route") == {("/a/",): 1.0}
    assert series(final, "token_proxy_rate_limited_total", "credential", "limit") == {
        ("b", "upstream"): 1.0
    }

    # Label values come from the configuration, never from the request.
    allowed: dict[str, set[str]] = {
        "route": {"/a/", "/b/", "/c/", "-", "none"},
        "credential": {"a", "b"},
        "client": {"-"},
        "method": set(KNOWN_METHODS) | {"OTHER"},
        "outcome": {"success", "error", "rejected", "failure"},  # token fetches, reloads
        "limit": {"credential", "client", "upstream"},
    }
    for (name, labels), _ in final.items():
        for key, label_value in labels:
            if key == "le":
                float(label_value)  # histogram bucket bounds: numbers
            elif key == "status":
                assert re.fullmatch(r"[1-5][0-9][0-9]", label_value), (name, label_value)
            else:
                assert label_value in allowed[key], (name, key, label_value)


# --- b. /-/ready -------------------------------------------------------------------------------


async def test_ready_lists_each_credential_when_ready(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """/-/ready answers 200 JSON listing every credential's state, without the token."""
    client = await start_proxy(two_credentials(token_server, upstream))
    tokens = app_of(client).runtime.tokens
    await wait_for(lambda: tokens["a"].state()["ready"] and tokens["b"].state()["ready"], timeout=5)
    async with client.get("/-/ready") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        text = await response.text()
    body = json.loads(text)
    assert body["status"] == "ready"
    assert set(body["credentials"]) == {"a", "b"}
    for state in body["credentials"].values():
        assert set(state) == STATE_KEYS
        assert state["ready"] is True
        assert 3590 < state["expires_in"] <= 3600
        assert state["last_error"] is None
        assert state["consecutive_failures"] == 0
        assert state["next_retry_in"] is None
    assert len(token_server.issued) == 2
    for token in token_server.issued:
        assert token not in text
    assert TEST_SECRET not in text


async def test_ready_explains_a_rejected_credential(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    rejecting_token_endpoint: str,
) -> None:
    """/-/ready answers 503 problem+json naming the credential that is not ready, why, and when
    it is retried, next to the ready one; no token or secret appears."""
    settings = two_credentials(token_server, upstream, b_token_url=rejecting_token_endpoint)
    client = await start_proxy(settings)
    tokens = app_of(client).runtime.tokens
    await wait_for(
        lambda: tokens["a"].state()["ready"] and tokens["b"].state()["last_error"] is not None,
        timeout=5,
    )
    async with client.get("/-/ready", headers={"X-Request-ID": "ready-1"}) as response:
        assert response.status == 503
        assert response.content_type == PROBLEM_JSON
        text = await response.text()
        retry_after = int(response.headers["Retry-After"])
        assert response.headers["X-Request-ID"] == "ready-1"
    body = json.loads(text)
    assert body["status"] == 503
    assert {"type", "title", "detail"} <= set(body)
    assert body["type"].endswith("/client-rejected")
    assert "rejected" in body["title"].lower()
    assert body["detail"].startswith("the token endpoint refused the credentials of: b (")
    assert body["request_id"] == "ready-1"
    assert set(body["credentials"]) == {"a", "b"}
    a, b = body["credentials"]["a"], body["credentials"]["b"]
    assert set(a) == STATE_KEYS
    assert set(b) == STATE_KEYS
    assert a["ready"] is True
    assert 3590 < a["expires_in"] <= 3600
    assert a["last_error"] is None
    assert a["next_retry_in"] is None
    assert b["ready"] is False
    assert b["expires_in"] is None
    assert b["last_error"] == "invalid_client"
    assert b["consecutive_failures"] == 1
    # A rejected client is retried slowly, 30 to 60 s later; Retry-After says when.
    assert 25 < b["next_retry_in"] <= 60
    assert b["next_retry_in"] <= retry_after < b["next_retry_in"] + 1.1
    assert token_server.issued
    for token in token_server.issued:
        assert token not in text
    assert TEST_SECRET not in text


async def test_ready_says_no_usable_token_yet_while_the_endpoint_fails(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """While the token endpoint fails (not a refusal), /-/ready's 503 says that no usable token
    is there yet, its Retry-After agrees with next_retry_in, and it carries a request id."""
    # More failures than the backoff can get through during the test, however short its jitter.
    token_server.script = [
        web.json_response({"error": "server_error"}, status=500) for _ in range(50)
    ]
    client = await start_proxy()
    manager = manager_of(client)
    await wait_for(lambda: manager.state()["next_retry_in"] is not None, timeout=5)
    async with client.get("/-/ready") as response:
        assert response.status == 503
        body = json.loads(await response.text())
        retry_after = int(response.headers["Retry-After"])
        request_id = response.headers["X-Request-ID"]
    assert body["type"].endswith("/token-unavailable")
    assert body["title"] == "No usable access token"
    assert body["detail"] == "no usable token yet for: default"
    assert SANE_ID.fullmatch(request_id)
    assert body["request_id"] == request_id
    next_retry_in = body["credentials"]["default"]["next_retry_in"]
    assert body["credentials"]["default"]["last_error"] == "server_error"
    assert max(1.0, next_retry_in) <= retry_after < max(1.0, next_retry_in) + 1.1


async def test_every_reserved_answer_carries_a_request_id(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    """/-/healthy, /-/ready and /-/metrics return the client's X-Request-ID, like every other
    answer, or one of their own."""
    client = await start_proxy()
    assert (await client.get("/warm")).status == 200
    for path in ("/-/healthy", "/-/ready", "/-/metrics"):
        async with client.get(path, headers={"X-Request-ID": f"rid{path}"}) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == f"rid{path}"
        async with client.get(path) as response:
            assert SANE_ID.fullmatch(response.headers["X-Request-ID"])


# --- c. request ids ----------------------------------------------------------------------------


async def test_request_id_kept_when_sane_replaced_when_not(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """A sane X-Request-ID goes upstream, back to the client and into the access line; a missing,
    too long, or space- or control-character-bearing one is replaced by a generated one."""
    proxy = await proxy_process()
    sane = ["req-Sane.42:x/y+z=@", "r" * 128]
    insane = ["x" * 129, "has space", "tab\there", None]
    answered: dict[str, str] = {}  # path -> X-Request-ID returned
    async with aiohttp.ClientSession() as session:
        for index, given in enumerate([*sane, *insane]):
            path = f"/rid/{index}"
            headers = {} if given is None else {"X-Request-ID": given}
            async with session.get(proxy.url + path, headers=headers) as response:
                assert response.status == 200
                answered[path] = response.headers["X-Request-ID"]
    assert proxy.stop() == 0
    sent_upstream = {r.raw_path: r.header("X-Request-ID") for r in upstream.requests}
    logged = {line["request_id"] for line in access_lines(proxy)}
    for index, given in enumerate([*sane, *insane]):
        path = f"/rid/{index}"
        returned = answered[path]
        assert sent_upstream[path] == returned
        assert returned in logged
        if given in sane:
            assert returned == given
        else:
            assert returned != given
            assert SANE_ID.fullmatch(returned)
    generated = [answered[f"/rid/{index}"] for index in range(len(sane), len(sane) + len(insane))]
    assert len(set(generated)) == len(generated)


async def test_every_log_line_of_a_replayed_request_carries_its_id(
    proxy_process: StartProcess, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """During a 401 replay, the rejection, the replay and the access lines all carry the
    request's id, and the background token fetch does not."""
    first_seen: list[str] = []

    async def reject_first_token(request: web.Request) -> web.Response:
        auth = request.headers["Authorization"]
        if not first_seen:
            first_seen.append(auth)
        if auth == first_seen[0]:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    upstream.handlers["/replay"] = reject_first_token
    proxy = await proxy_process()
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/replay", headers={"X-Request-ID": "replay-req-1"}) as response,
    ):
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "replay-req-1"
    assert len(token_server.issued) == 2
    assert proxy.stop() == 0
    lines = json_lines(proxy.log_text())

    def the(event: str) -> dict[str, Any]:
        found = [line for line in lines if line["event"].startswith(event)]
        assert len(found) == 1, (event, found)
        return found[0]

    assert the("token rejected upstream")["request_id"] == "replay-req-1"
    assert the("upstream answered 401; replaying once")["request_id"] == "replay-req-1"
    access = the("request")
    assert access["logger"] == "proxy.access"
    assert access["request_id"] == "replay-req-1"
    assert access["replayed"] is True
    fetched = [line for line in lines if line["event"] == "token fetched"]
    assert len(fetched) == 2
    for line in fetched:
        assert "request_id" not in line


# --- d. access log -----------------------------------------------------------------------------


async def test_access_log_one_line_per_request_with_every_field(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """Each request logs exactly one access line with route, client, method, status, bytes,
    durations and the age of the token it carried."""

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": "none here"}, status=404)

    upstream.handlers["/missing"] = not_found
    proxy = await proxy_process()
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/one", headers={"X-Request-ID": "al-1"}) as response:
            assert response.status == 200
            size_one = len(await response.read())
        async with session.put(
            proxy.url + "/two", data=b"12345678", headers={"X-Request-ID": "al-2"}
        ) as response:
            assert response.status == 200
            size_two = len(await response.read())
        async with session.get(
            proxy.url + "/missing", headers={"X-Request-ID": "al-3"}
        ) as response:
            assert response.status == 404
            size_three = len(await response.read())
    assert proxy.stop() == 0
    lines = {line["request_id"]: line for line in access_lines(proxy)}
    assert len(access_lines(proxy)) == 3
    expected = {
        "al-1": ("GET", 200, 0, size_one),
        "al-2": ("PUT", 200, 8, size_two),
        "al-3": ("GET", 404, 0, size_three),
    }
    for request_id, (method, status, bytes_in, bytes_out) in expected.items():
        line = lines[request_id]
        assert line["event"] == "request"
        assert line["level"] == "info"
        assert line["route"] == "/"
        assert line["client"] == "-"
        assert line["method"] == method
        assert line["status"] == status
        assert line["bytes_in"] == bytes_in
        assert line["bytes_out"] == bytes_out
        assert isinstance(line["duration_ms"], float)
        assert isinstance(line["upstream_ms"], float)
        assert 0 < line["upstream_ms"] <= line["duration_ms"]
        assert isinstance(line["token_age_s"], float)
        assert 0 <= line["token_age_s"] < 60


async def test_access_log_can_be_turned_off(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """TOKEN_PROXY_ACCESS_LOG=false writes no access line, not even for errors."""

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "oops"}, status=500)

    upstream.handlers["/broken"] = broken
    proxy = await proxy_process({"TOKEN_PROXY_ACCESS_LOG": "false"})
    async with aiohttp.ClientSession() as session:
        for path in ("/one", "/two", "/broken"):
            async with session.get(proxy.url + path) as response:
                await response.read()
    assert proxy.stop() == 0
    assert [r.raw_path for r in upstream.requests] == ["/one", "/two", "/broken"]
    events = [line["event"] for line in json_lines(proxy.log_text())]
    assert "token-proxy listening" in events  # the log itself works
    assert access_lines(proxy) == []


async def test_access_log_sampling_keeps_errors(
    proxy_process: StartProcess, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With a tiny access_log_sample, successful requests go (almost surely) unlogged while a
    404 for no route and an upstream 500 are still logged."""

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "oops"}, status=500)

    upstream.handlers["/broken"] = broken
    config = tmp_path / "routes.toml"
    config.write_text(
        f'[[routes]]\nprefix = "/api/"\nupstream = "{upstream.url}"\ncredential = "default"\n'
    )
    proxy = await proxy_process(
        {"TOKEN_PROXY_ACCESS_LOG_SAMPLE": "0.000001", "TOKEN_PROXY_CONFIG": str(config)}
    )
    async with aiohttp.ClientSession() as session:
        for index in range(20):
            async with session.get(proxy.url + f"/api/ok{index}") as response:
                assert response.status == 200
        async with session.get(proxy.url + "/elsewhere") as response:
            assert response.status == 404
            assert response.content_type == PROBLEM_JSON
        async with session.get(proxy.url + "/api/broken") as response:
            assert response.status == 500
    assert proxy.stop() == 0
    lines = access_lines(proxy)
    assert [(line["route"], line["status"]) for line in lines] == [("none", 404), ("/api/", 500)]
    no_route = lines[0]
    assert no_route["upstream_ms"] == 0
    assert no_route["token_age_s"] is None


CREDENTIAL_QUERY = (
    "namespace=dynamic-us&access_token=AT-value-1&Client_Secret=CS-value-2&code=CODE-value-3"
    "&API_KEY=AK-value-4&password=PW-value-5&key=K-value-6&access%5Ftoken=AT-value-7"
    "&locale=en_US&flag"
)
MASKED_QUERY = (
    "namespace=dynamic-us&access_token=[redacted]&Client_Secret=[redacted]&code=[redacted]"
    "&API_KEY=[redacted]&password=[redacted]&key=[redacted]&access%5Ftoken=[redacted]"
    "&locale=en_US&flag"
)
CREDENTIAL_VALUES = [f"-value-{n}" for n in range(1, 8)]


def access_lines_of(proxy_log: CapturedLog) -> list[dict[str, Any]]:
    return [line for line in proxy_log.lines() if line.get("logger") == "proxy.access"]


async def get_as_is(client: Client, target: str) -> int:
    """GET `target` exactly as written (the test client would decode %5F); the status."""
    url = URL(f"http://{client.host}:{client.port}{target}", encoded=True)
    async with client.session.get(url) as response:
        await response.read()
        return response.status


async def test_access_line_carries_the_path_with_credentials_masked(
    start_proxy: ProxyFactory, upstream: FakeUpstream, proxy_log: CapturedLog
) -> None:
    """The access line names the request path; the values of query parameters that can hold
    credentials are masked (any case, percent-encoded names too), everything else is as sent,
    and upstream still gets the query untouched. Without debug level, no upstream URL."""
    client = await start_proxy(log_level="info")
    target = f"/data/item?{CREDENTIAL_QUERY}"
    for path in ("/plain/path", target):
        assert await get_as_is(client, path) == 200
    assert [r.raw_path for r in upstream.requests] == ["/plain/path", target]
    plain, masked = access_lines_of(proxy_log)
    assert plain["path"] == "/plain/path"
    assert masked["path"] == f"/data/item?{MASKED_QUERY}"
    assert list(masked)[:3] == ["method", "path", "route"]
    assert "upstream_url" not in masked
    for value in CREDENTIAL_VALUES:
        assert value not in proxy_log.text()


async def test_access_line_names_the_upstream_url_at_debug_level(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    proxy_log: CapturedLog,
) -> None:
    """At debug level the access line carries the upstream URL the request went to (prefix
    stripped, joined to the upstream's base path, credentials masked), and null when no route
    matched."""
    settings = Settings.model_validate(
        {
            "port": 0,
            "log_level": "debug",
            "credentials": {
                "c": {
                    "client_id": "client-c",
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [{"prefix": "/eu/", "upstream": upstream.url + "/v2", "credential": "c"}],
        }
    )
    client = await start_proxy(settings)
    assert await get_as_is(client, f"/eu/item?{CREDENTIAL_QUERY}") == 200
    async with client.get("/nowhere") as response:
        assert response.status == 404
    assert [r.raw_path for r in upstream.requests] == [f"/v2/item?{CREDENTIAL_QUERY}"]
    routed, unrouted = access_lines_of(proxy_log)
    assert routed["path"] == f"/eu/item?{MASKED_QUERY}"
    assert routed["upstream_url"] == f"{upstream.url}/v2/item?{MASKED_QUERY}"
    assert unrouted["upstream_url"] is None
    for value in CREDENTIAL_VALUES:
        assert value not in proxy_log.text()


async def test_bytes_out_counts_the_bodies_the_proxy_writes_itself(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    proxy_log: CapturedLog,
) -> None:
    """The access line's bytes_out is the size of the body the client got, also when the proxy
    wrote it (a 404 problem+json for no route, a 502 for an unreachable upstream)."""
    settings = two_credentials(
        token_server,
        upstream,
        extra_routes=[
            {"prefix": "/gone/", "upstream": f"http://127.0.0.1:{free_port()}", "credential": "a"}
        ],
    )
    client = await start_proxy(settings)
    sizes = {}
    for path in ("/a/relayed", "/nowhere", "/gone/x"):
        async with client.get(path, headers={"X-Request-ID": f"bo{path}"}) as response:
            sizes[f"bo{path}"] = (response.status, len(await response.read()))
    assert [status for status, _ in sizes.values()] == [200, 404, 502]
    lines = {line["request_id"]: line for line in access_lines_of(proxy_log)}
    for request_id, (status, size) in sizes.items():
        assert (lines[request_id]["status"], lines[request_id]["bytes_out"]) == (status, size)
        assert size > 0


# --- e. token lifecycle events -----------------------------------------------------------------


async def test_token_lifecycle_events_at_info(
    proxy_process: StartProcess, token_server: FakeTokenServer
) -> None:
    """At log level info the proxy logs each token fetched (expires_in, scope), the refresh it
    schedules, and a warning for a failed token request (error, attempt, retry_in)."""
    token_server.expires_in = 2
    token_server.scope = "wow.profile sc2.profile"
    token_server.script.append(web.json_response({"error": "temporarily_unavailable"}, status=503))
    proxy = await proxy_process({"TOKEN_PROXY_LOG_LEVEL": "info"})
    await wait_for(lambda: len(token_server.issued) >= 2, timeout=10)  # one background refresh
    assert proxy.stop() == 0
    lines = json_lines(proxy.log_text())
    assert all(line["level"] != "debug" for line in lines)

    failed = [line for line in lines if line["event"] == "token request failed"]
    assert len(failed) == 1
    assert failed[0]["level"] == "warning"
    assert failed[0]["credential"] == "default"
    assert failed[0]["error"] == "temporarily_unavailable"
    assert failed[0]["attempt"] == 1
    assert 0 <= failed[0]["retry_in"] <= 1

    fetched = [line for line in lines if line["event"] == "token fetched"]
    assert len(fetched) >= 2
    for line in fetched:
        assert line["level"] == "info"
        assert line["credential"] == "default"
        assert line["expires_in"] == 2
        assert line["scope"] == "wow.profile sc2.profile"

    scheduled = [line for line in lines if line["event"] == "token refresh scheduled"]
    assert len(scheduled) >= 2
    for line in scheduled:
        assert line["level"] == "info"
        assert line["credential"] == "default"
        assert 0 < line["refresh_in"] <= 1.6
        assert isinstance(line["refresh_at"], str)
    text = proxy.log_text()
    for token in token_server.issued:
        assert token not in text


# --- f. metrics_port ---------------------------------------------------------------------------


async def test_metrics_port_serves_metrics_and_main_port_does_not(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """With metrics_port set, /-/metrics is served on that port and is a 404 on the main one."""
    metrics_port = free_port()
    proxy = await proxy_process({"TOKEN_PROXY_METRICS_PORT": str(metrics_port)})
    metrics_url = f"http://127.0.0.1:{metrics_port}/-/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/counted") as response:
            assert response.status == 200
        async with session.get(proxy.url + "/-/metrics") as response:
            assert response.status == 404
            assert response.content_type == PROBLEM_JSON
            assert "token_proxy_" not in await response.text()
        async with session.get(metrics_url) as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            samples = parse_metrics(await response.text())
    assert proxy.stop() == 0
    requests = series(samples, "token_proxy_requests_total", "route", "method", "status")
    # The forwarded request and the refused scrape (the start-up /-/ready polls are not checked).
    assert requests[("/", "GET", "200")] == 1.0
    assert requests[("-", "GET", "404")] == 1.0
    # Scrapes on the metrics port are not requests of the proxy: nothing is in flight.
    assert value_of(samples, "token_proxy_in_flight_requests") == 0.0
    assert value_of(
        samples, "token_proxy_token_fetches_total", credential="default", outcome="success"
    )


# --- the Grafana dashboard ---------------------------------------------------------------------


def _panels(container: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in container.get("panels", []):
        found.append(panel)
        found.extend(_panels(panel))  # rows may hold collapsed panels
    return found


def test_grafana_dashboard_charts_every_metric() -> None:
    """deploy/grafana-dashboard.json is a Grafana dashboard on a ${DS_PROMETHEUS} variable whose
    panel queries use every metric registered in proxy.metrics.Metrics."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    assert dashboard["title"]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    exprs: list[str] = []
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["refId"]
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert expr.count("{") == expr.count("}"), expr
            exprs.append(expr)
    everything = "\n".join(exprs)

    exported: list[str] = []
    for family in Metrics().registry.collect():
        if family.type == "counter":
            exported.append(family.name + "_total")
        elif family.type == "histogram":
            exported.append(family.name + "_bucket")
        else:
            exported.append(family.name)
    assert len(exported) == 17
    missing = [
        name for name in exported if not re.search(rf"(?<![A-Za-z0-9_]){name}\b", everything)
    ]
    assert missing == []
    assert "histogram_quantile(0.99" in everything
    assert "histogram_quantile(0.5" in everything
    assert "token_proxy_token_expiry_timestamp_seconds" in everything
    assert re.search(r"token_proxy_token_expiry_timestamp_seconds[^\n]*- time\(\)", everything)


def test_request_metrics_buckets_and_series() -> None:
    """A single process counts requests in plain numbers, not prometheus-client's locked
    objects: each duration lands in the first bucket whose bound holds it, and the series are
    the ones prometheus-client's Counter and Histogram export (_total, _bucket, _count, _sum,
    _created). Workers keep prometheus-client's objects (test_workers)."""
    metrics = Metrics()
    for seconds in (0.001, 0.0011, 100.0):
        metrics.observe_request(route="/", method="GET", status=200, client="-", seconds=seconds)
        metrics.observe_upstream("/", seconds)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    route = (("route", "/"),)
    for name in ("token_proxy_request_duration_seconds", "token_proxy_upstream_duration_seconds"):
        assert samples[(f"{name}_bucket", (("le", "0.001"), *route))] == 1
        assert samples[(f"{name}_bucket", (("le", "0.0025"), *route))] == 2
        assert samples[(f"{name}_bucket", (("le", "60.0"), *route))] == 2
        assert samples[(f"{name}_bucket", (("le", "+Inf"), *route))] == 3
        assert samples[(f"{name}_count", route)] == 3
        assert samples[(f"{name}_sum", route)] == pytest.approx(100.0021)
        assert samples[(f"{name}_created", route)] > 0
    labels = (("client", "-"), ("method", "GET"), ("route", "/"), ("status", "200"))
    assert samples[("token_proxy_requests_total", labels)] == 3
    assert samples[("token_proxy_requests_created", labels)] > 0


def test_request_metrics_obey_the_switch_for_created_series() -> None:
    """PROMETHEUS_DISABLE_CREATED_SERIES, which prometheus-client's own objects obey, turns
    off the _created series of the request metrics too."""
    script = (
        "from proxy.metrics import Metrics\n"
        "m = Metrics()\n"
        "m.observe_request(route='/', method='GET', status=200, client='-', seconds=0.1)\n"
        "m.observe_upstream('/', 0.1)\n"
        "print(m.render().decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_DISABLE_CREATED_SERIES": "true"}
    text = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "token_proxy_requests_total{" in text
    assert "token_proxy_request_duration_seconds_count{" in text
    assert "_created" not in text
