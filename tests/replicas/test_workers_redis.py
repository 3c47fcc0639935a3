"""`--workers 2` with Redis: one token request for the group, and the workers share every
limit whole through Redis, rather than each applying its half of it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aioredis

from proxy.store.redis_url import parse_redis_url
from tests.conftest import FakeTokenServer, FakeUpstream
from tests.redis_server import RedisServer
from tests.replicas.conftest import Arrivals, StartReplicas, most_in_any_window

LIMIT = 10
REQUESTS = 30


async def test_two_workers_make_one_token_request_and_share_each_limit_whole_through_redis(
    redis_server: RedisServer,
    start_replicas: StartReplicas,
    upstream: FakeUpstream,
    token_server: FakeTokenServer,
) -> None:
    arrivals = Arrivals()
    upstream.handlers["/api"] = arrivals
    (group,) = await start_replicas(
        1,
        redis_url=redis_server.url,
        # The hour keeps every entry in Redis, to be counted.
        table={"rate_limit": [f"{LIMIT}/second", "1000/hour"], "rate_limit_max_wait": 5.0},
        env={"TOKEN_PROXY_WORKERS": "2"},
    )
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # the kernel spreads them
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        statuses = await asyncio.gather(*(fetch(session, group.url, i) for i in range(REQUESTS)))
        seconds = time.monotonic() - started
        store = (await group.ready(session))["store"]
    served_by = {
        int(event["worker"])
        for event in group.events()
        if event.get("logger") == "proxy.access" and "worker" in event
    }
    client = aioredis.Redis(**parse_redis_url(redis_server.url).client_kwargs(timeout=2.0))
    try:
        keys = [key async for key in client.scan_iter(match="*rl:credential:*:hits")]
        counted = [await client.zcard(key) for key in keys]
    finally:
        await client.aclose()
    most = most_in_any_window(arrivals.times(), 1.0)
    print(
        f"\n--workers 2 with Redis, {LIMIT}/second: {REQUESTS} requests in {seconds:.2f} s, served "
        f"by workers {sorted(served_by)}, at most {most} in any sliding 1 s window, "
        f"{counted} counted in Redis, {len(token_server.requests)} token request(s)"
    )
    assert statuses == [200] * REQUESTS
    assert len(token_server.requests) == 1
    assert (store["backend"], store["state"]) == ("redis", "shared")
    assert served_by == {1, 2}
    assert group.said("rate limits are shared whole by the workers, through Redis")
    assert counted == [REQUESTS]
    assert most <= LIMIT
    # The whole limit for the group: 10 at once, then 10 a second (5 a second if each worker
    # applied its half of it to the shared count).
    assert (REQUESTS - LIMIT) / LIMIT - 0.2 <= seconds < (REQUESTS - LIMIT) / LIMIT + 1.5


async def fetch(session: aiohttp.ClientSession, url: str, index: int) -> int:
    async with session.get(f"{url}/api?i={index}") as response:
        await response.read()
        return response.status
