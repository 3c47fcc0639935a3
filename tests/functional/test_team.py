"""Team mode in-process: credential rate limits measured where requests reach upstream, 429s
and their metric, first come first served, upstream 429 pauses, tokens kept to their routes,
per-client limits, and Battle.net region routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings
from proxy.routing import RouteTable
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    app_of,
    running_token_server,
    wait_for,
)

SMALL_KEY = "small-team-key-3f9a1c0b7e52d4a8"
BIG_KEY = "big-team-key-8b1e5d2f0c4a7396e1"
OTHER_CLIENT_ID = "other-client-id"
OTHER_SECRET = "Other-S3cret-Value-Never-Logged-2b9e"


# --- helpers -----------------------------------------------------------------------------------


def team_settings(
    credentials: dict[str, dict[str, Any]],
    routes: Sequence[tuple[str, str, str]],
    **values: Any,
) -> Settings:
    """Settings of credentials (client id and secret filled in) and (prefix, upstream,
    credential) routes."""
    tables = {
        name: {"client_id": TEST_CLIENT_ID, "client_secret": TEST_SECRET, **table}
        for name, table in credentials.items()
    }
    return Settings.model_validate(
        {
            "port": 0,
            "credentials": tables,
            "routes": [
                {"prefix": prefix, "upstream": base, "credential": name}
                for prefix, base, name in routes
            ],
            **values,
        }
    )


def arrivals_at(upstream: FakeUpstream, path: str, status: int = 200) -> list[float]:
    """Install a handler on `path` that notes when each request arrives; the list it fills."""
    times: list[float] = []

    async def note(request: web.Request) -> web.Response:
        times.append(time.monotonic())
        return web.json_response({"n": request.query.get("n")}, status=status)

    upstream.handlers[path] = note
    return times


def most_in_one_second(times: Sequence[float]) -> int:
    """The most arrivals in any window [t, t + 1 s)."""
    ordered = sorted(times)
    most = 0
    end = 0
    for start, first in enumerate(ordered):
        while end < len(ordered) and ordered[end] < first + 1.0:
            end += 1
        most = max(most, end - start)
    return most


async def status_of(client: Client, path: str, **kwargs: Any) -> int:
    async with client.get(path, **kwargs) as response:
        await response.read()
        return response.status


async def rate_limited(client: Client) -> dict[tuple[str, str], float]:
    """token_proxy_rate_limited_total by credential and limit, from GET /-/metrics."""
    async with client.get("/-/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.labels["credential"], sample.labels["limit"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "token_proxy_rate_limited_total"
    }


def requests_seen(client: Client) -> float:
    """Requests the proxy has begun handling: those in flight plus those answered."""
    app = app_of(client)
    registry = app.metrics.registry
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in {"token_proxy_in_flight_requests", "token_proxy_requests_total"}:
                total += sample.value
    return total


def taken_in(client: Client, count: int) -> Callable[[], bool]:
    """A condition: the proxy has begun handling `count` requests."""
    return lambda: requests_seen(client) >= count


def bearer(key: str) -> dict[str, str]:
    """The header a team client sends its key in."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def second_token_server() -> AsyncIterator[FakeTokenServer]:
    """A token endpoint of its own for a second credential."""
    async with running_token_server() as fake:
        yield fake


# --- tests -------------------------------------------------------------------------------------


async def test_credential_limit_holds_in_every_second_at_upstream(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """120 concurrent requests under 20/second all succeed, and no one-second window sees more
    than 20 of them arrive upstream."""
    times = arrivals_at(upstream, "/burst")
    settings = team_settings(
        {
            "c": {
                "token_url": token_server.url,
                "rate_limit": ["20/second"],
                "rate_limit_max_wait": 10,
            }
        },
        [("/", upstream.url, "c")],
    )
    client = await start_proxy(settings)
    await wait_for(lambda: bool(token_server.issued))
    assert await status_of(client, "/-/ready") == 200
    statuses = await asyncio.gather(*(status_of(client, f"/burst?n={n}") for n in range(120)))
    assert statuses == [200] * 120
    assert len(times) == 120
    assert most_in_one_second(times) <= 20
    # The limit is used, not just respected: six full seconds' worth take about five seconds.
    assert max(times) - min(times) < 6.5


async def test_credential_limit_holds_when_a_token_outage_ends(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Requests that queued while no token was available still reach upstream at no more
    than 20 in any second once the token comes."""
    token_server.release = asyncio.Event()
    times = arrivals_at(upstream, "/outage")
    settings = team_settings(
        {
            "c": {
                "token_url": token_server.url,
                "rate_limit": ["20/second"],
                "rate_limit_max_wait": 10,
            }
        },
        [("/", upstream.url, "c")],
    )
    client = await start_proxy(settings)
    tasks = [asyncio.create_task(status_of(client, f"/outage?n={n}")) for n in range(40)]
    await wait_for(taken_in(client, 40))
    await asyncio.sleep(1.3)  # the token endpoint stays down for 1.3 s: the scenario, not a wait
    assert not token_server.issued
    token_server.release.set()
    assert await asyncio.gather(*tasks) == [200] * 40
    assert len(times) == 40
    assert most_in_one_second(times) <= 20


async def test_replay_after_401_counts_against_the_limit(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """The replay that follows an upstream 401 is a request upstream too: under 2/second, a
    replayed request and the next one do not put three requests upstream within one second."""
    times: list[float] = []

    async def reject_first(request: web.Request) -> web.Response:
        times.append(time.monotonic())
        if len(times) == 1:
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({})

    upstream.handlers["/replayed"] = reject_first
    settings = team_settings(
        {
            "c": {
                "token_url": token_server.url,
                "rate_limit": ["2/second"],
                "rate_limit_max_wait": 5,
            }
        },
        [("/", upstream.url, "c")],
    )
    client = await start_proxy(settings)
    assert await status_of(client, "/replayed") == 200
    assert len(times) == 2
    assert await status_of(client, "/replayed") == 200
    assert len(times) == 3
    assert most_in_one_second(times) <= 2


async def test_overflow_gets_429_problem_with_retry_after_and_is_counted(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """With 5/second and a 0.2 s max wait, 15 of 20 concurrent requests get 429 problem+json
    with an integer Retry-After >= 1, and token_proxy_rate_limited_total counts them."""
    times = arrivals_at(upstream, "/many")
    settings = team_settings(
        {
            "c": {
                "token_url": token_server.url,
                "rate_limit": ["5/second"],
                "rate_limit_max_wait": 0.2,
            }
        },
        [("/", upstream.url, "c")],
    )
    client = await start_proxy(settings)

    async def one() -> tuple[int, str, str | None, dict[str, Any] | None]:
        async with client.get("/many") as response:
            body = await response.json(content_type=None)
            return (
                response.status,
                response.content_type,
                response.headers.get("Retry-After"),
                body,
            )

    started = time.monotonic()
    answers = await asyncio.gather(*(one() for _ in range(20)))
    assert time.monotonic() - started < 2.0
    ok = [answer for answer in answers if answer[0] == 200]
    refused = [answer for answer in answers if answer[0] == 429]
    assert len(ok) == 5
    assert len(refused) == 15
    assert len(times) == 5
    for _, content_type, retry_after, body in refused:
        assert content_type == "application/problem+json"
        assert retry_after is not None
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        assert body is not None
        assert body["status"] == 429
        assert {"type", "title", "detail"} <= body.keys()
    assert await rate_limited(client) == {("c", "credential"): 15.0}


async def test_queued_requests_are_admitted_first_come_first_served(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Under 2/second, six requests sent one after another reach upstream in the order sent."""
    order: list[str | None] = []
    times: list[float] = []

    async def note(request: web.Request) -> web.Response:
        order.append(request.query.get("n"))
        times.append(time.monotonic())
        return web.json_response({})

    upstream.handlers["/fifo"] = note
    settings = team_settings(
        {
            "c": {
                "token_url": token_server.url,
                "rate_limit": ["2/second"],
                "rate_limit_max_wait": 5,
            }
        },
        [("/", upstream.url, "c")],
    )
    client = await start_proxy(settings)
    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(status_of(client, f"/fifo?n={n}")))
        # The next request is sent only once the proxy has taken this one in.
        await wait_for(taken_in(client, n + 1), timeout=5, interval=0.005)
    assert await asyncio.gather(*tasks) == [200] * 6
    assert order == [str(n) for n in range(6)]
    # They did queue: the last two could only go two seconds after the first two.
    assert times[-1] - times[0] >= 1.9


async def test_upstream_429_pauses_only_its_credential(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    second_token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    """An upstream 429 with Retry-After: 1 reaches the client as is and holds that credential's
    next request back for about a second, while another credential goes on; it is counted."""
    limited_at: list[float] = []

    async def slow_down(request: web.Request) -> web.Response:
        limited_at.append(time.monotonic())
        return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})

    upstream.handlers["/one/limited"] = slow_down
    after = arrivals_at(upstream, "/one/after")
    other = arrivals_at(upstream, "/two/free")
    settings = team_settings(
        {
            "one": {"token_url": token_server.url},
            "two": {
                "client_id": OTHER_CLIENT_ID,
                "client_secret": OTHER_SECRET,
                "token_url": second_token_server.url,
            },
        },
        [("/one/", upstream.url + "/one", "one"), ("/two/", upstream.url + "/two", "two")],
    )
    client = await start_proxy(settings)
    async with client.get("/one/limited") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert await response.text() == "slow down"
    paused = asyncio.create_task(status_of(client, "/one/after"))
    assert await status_of(client, "/two/free") == 200
    assert not paused.done()
    assert await paused == 200
    assert len(limited_at) == len(after) == len(other) == 1
    assert other[0] - limited_at[0] < 0.5
    assert 0.95 <= after[0] - limited_at[0] < 2.5
    assert await rate_limited(client) == {("one", "upstream"): 1.0}


async def test_two_credentials_never_mix_tokens(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    second_token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    """Each route's upstream requests carry only its own credential's tokens, each fetched with
    its own client id, also after a 401 makes both credentials fetch a new token."""
    rejected: set[str] = set()

    async def reject_first(request: web.Request) -> web.Response:
        # The first request of each route is refused once, so each credential fetches anew.
        route = request.path.split("/")[1]
        if route not in rejected:
            rejected.add(route)
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({})

    upstream.handlers["/A/x"] = reject_first
    upstream.handlers["/B/x"] = reject_first
    settings = team_settings(
        {
            "a": {"token_url": token_server.url},
            "b": {
                "client_id": OTHER_CLIENT_ID,
                "client_secret": OTHER_SECRET,
                "token_url": second_token_server.url,
            },
        },
        [("/a/", upstream.url + "/A", "a"), ("/b/", upstream.url + "/B", "b")],
    )
    client = await start_proxy(settings)
    await wait_for(lambda: bool(token_server.issued and second_token_server.issued))
    paths = [f"/{route}/x?n={n}" for n in range(20) for route in ("a", "b")]
    statuses = await asyncio.gather(*(status_of(client, path) for path in paths))
    assert statuses == [200] * len(paths)

    assert {request.basic_credentials for request in token_server.requests} == {
        (TEST_CLIENT_ID, TEST_SECRET)
    }
    assert {request.basic_credentials for request in second_token_server.requests} == {
        (OTHER_CLIENT_ID, OTHER_SECRET)
    }
    assert len(token_server.issued) >= 2
    assert len(second_token_server.issued) >= 2
    tokens_a = {f"Bearer {token}" for token in token_server.issued}
    tokens_b = {f"Bearer {token}" for token in second_token_server.issued}
    seen_a = {r.header("Authorization") for r in upstream.requests if r.raw_path.startswith("/A/")}
    seen_b = {r.header("Authorization") for r in upstream.requests if r.raw_path.startswith("/B/")}
    assert len(upstream.requests) == len(paths) + 2
    assert seen_a <= tokens_a
    assert seen_b <= tokens_b
    assert len(seen_a) >= 2
    assert len(seen_b) >= 2


async def test_client_rate_limit_applies_to_that_client_only(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Client "small" (2/second, 0.1 s max wait) gets 429 for part of 6 concurrent requests,
    while client "big" (no limit of its own) gets 200 for all of its 6; the refusals are
    counted as the client limit's."""
    settings = team_settings(
        {"c": {"token_url": token_server.url}},
        [("/", upstream.url, "c")],
        clients=[
            {
                "name": "small",
                "key": SMALL_KEY,
                "rate_limit": ["2/second"],
                "rate_limit_max_wait": 0.1,
            },
            {"name": "big", "key": BIG_KEY},
        ],
    )
    client = await start_proxy(settings)
    small = await asyncio.gather(
        *(status_of(client, "/s", headers=bearer(SMALL_KEY)) for _ in range(6))
    )
    big = await asyncio.gather(
        *(status_of(client, "/b", headers=bearer(BIG_KEY)) for _ in range(6))
    )
    assert sorted(small) == [200, 200, 429, 429, 429, 429]
    assert big == [200] * 6
    assert await status_of(client, "/b") == 401
    assert sum(1 for r in upstream.requests if r.raw_path == "/s") == 2
    assert sum(1 for r in upstream.requests if r.raw_path == "/b") == 6
    assert await rate_limited(client) == {("c", "client"): 4.0}


def test_region_routes_reach_each_region_api() -> None:
    """region_routes = us, eu gives routes /us/ and /eu/ to us.api.blizzard.com and
    eu.api.blizzard.com with the credential's token (checked on the route table, not online)."""
    settings = Settings.model_validate(
        {
            "credentials": {
                "bnet": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "region_routes": ["us", "eu"],
                }
            },
        }
    )
    assert {(r.prefix, r.upstream, r.credential) for r in settings.routes} == {
        ("/us/", "https://us.api.blizzard.com", "bnet"),
        ("/eu/", "https://eu.api.blizzard.com", "bnet"),
    }
    table = RouteTable(settings.routes)
    eu = table.match("/eu/data/wow/token/index?namespace=dynamic-eu")
    assert eu.target == "https://eu.api.blizzard.com/data/wow/token/index?namespace=dynamic-eu"
    assert eu.route.credential == "bnet"
    us = table.match("/us/profile/user/wow")
    assert us.target == "https://us.api.blizzard.com/profile/user/wow"
    assert settings.credentials["bnet"].token_url == "https://oauth.battle.net/token"
