"""One token for every replica through a real Redis: three real proxies fetch it once at
start-up, refresh it once at 80 % of its life under load, and replace a revoked one once,
however many requests each of them has in flight."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
from aiohttp import web

from tests.conftest import FakeTokenServer, FakeUpstream
from tests.redis_server import RedisServer
from tests.replicas.conftest import Replica, StartReplicas


async def get(session: aiohttp.ClientSession, replica: Replica, index: int) -> int:
    async with session.get(f"{replica.url}/api?i={index}") as response:
        await response.read()
        return response.status


def spread(
    session: aiohttp.ClientSession, replicas: list[Replica], count: int, start: int = 0
) -> list[asyncio.Task[int]]:
    """`count` requests at once, dealt to the replicas in turn."""
    return [
        asyncio.create_task(get(session, replica, start + index))
        for index, replica in zip(range(count), itertools.cycle(replicas), strict=False)
    ]


async def test_three_replicas_starting_together_make_one_token_request(
    redis_server: RedisServer,
    start_replicas: StartReplicas,
    token_server: FakeTokenServer,
) -> None:
    token_server.delay = 1.0  # every replica asks while the first request is still out
    replicas = await start_replicas(3, redis_url=redis_server.url, wait="listening")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        statuses = await asyncio.gather(*spread(session, replicas, 100))
    print(
        f"\n3 replicas, token endpoint 1 s slow, 100 requests as they listen: "
        f"{len(token_server.requests)} token request(s), statuses {sorted(set(statuses))}"
    )
    assert statuses == [200] * 100
    assert len(token_server.requests) == 1


async def test_the_refresh_at_80_percent_under_load_is_one_request_for_all_replicas(
    redis_server: RedisServer,
    start_replicas: StartReplicas,
    token_server: FakeTokenServer,
) -> None:
    token_server.expires_in = 2  # refreshed every 1.6 s
    replicas = await start_replicas(3, redis_url=redis_server.url)
    assert len(token_server.requests) == 1
    loop = asyncio.get_running_loop()
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        deadline = loop.time() + 5.5  # three refreshes
        index = 0
        while loop.time() < deadline:
            statuses += await asyncio.gather(*spread(session, replicas, 15, index))
            index += 15
    times = [request.at for request in token_server.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    print(
        f"\n3 replicas under load for 5.5 s, tokens of 2 s: {len(times)} token requests, "
        f"{len(statuses)} requests, gaps {[round(gap, 2) for gap in gaps]} s, statuses "
        f"{sorted(set(statuses))}"
    )
    assert set(statuses) == {200}
    assert len(times) >= 4  # start-up and three refreshes
    # One request per refresh, whichever replica made it: none close after another.
    assert all(gap > 1.0 for gap in gaps)


async def test_a_revoked_token_costs_one_token_request_for_sixty_requests_on_three_replicas(
    redis_server: RedisServer,
    start_replicas: StartReplicas,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    replicas = await start_replicas(3, redis_url=redis_server.url)
    assert len(token_server.requests) == 1
    revoked = {f"Bearer {token_server.issued[0]}"}

    async def api(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") in revoked:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    upstream.handlers["/api"] = api
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        statuses = await asyncio.gather(*spread(session, replicas, 60))
    print(
        f"\ntoken revoked, 60 requests on 3 warm replicas: "
        f"{len(token_server.requests) - 1} new token request(s), statuses {sorted(set(statuses))}"
    )
    assert statuses == [200] * 60
    assert len(token_server.requests) == 2
