"""Rate limits and 429 pauses shared through a real Redis by three real proxy processes, each
naming the credential differently: one quota in every sliding second at the upstream, waiting
requests served in the order they came whichever replica they came to, and an upstream 429 on
one replica holding back all three."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy.store.redis_calls import stop_task
from proxy.store.redis_url import parse_redis_url
from tests.conftest import FakeUpstream
from tests.redis_server import RedisServer
from tests.replicas.conftest import Arrivals, StartReplicas, most_in_any_window

LIMIT = 20


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    """GET `url`: its status and how long it took."""
    started = time.monotonic()
    async with session.get(url) as response:
        await response.read()
        return response.status, time.monotonic() - started


async def test_twenty_per_second_shared_by_three_replicas_holds_and_serves_waiters_in_order(
    redis_server: RedisServer, start_replicas: StartReplicas, upstream: FakeUpstream
) -> None:
    arrivals = Arrivals()
    upstream.handlers["/limited"] = arrivals
    replicas = await start_replicas(
        3,
        redis_url=redis_server.url,
        table={"rate_limit": [f"{LIMIT}/second"], "rate_limit_max_wait": 8.0},
    )
    urls = [replica.url for replica in replicas]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # A burst of 90 at once, 30 per replica: 4.5 s of quota.
        started = time.monotonic()
        burst = await asyncio.gather(
            *(get(session, f"{urls[i % 3]}/limited?burst={i}") for i in range(90))
        )
        burst_seconds = time.monotonic() - started
        assert [status for status, _ in burst] == [200] * 90
        # Then, after a quiet second and a half, requests in a known order: twenty 50 ms
        # apart, which fill the window, then twenty 40 ms apart, which must each wait for
        # the one twenty before it to leave the window, on whichever replica it went to.
        # (40 ms: more than a busy machine's scheduling delays them by, so that the order
        # the waiters are sent in is the order they reach Redis in.)
        await asyncio.sleep(1.5)
        ordered: list[asyncio.Task[tuple[int, float]]] = []
        begin = time.monotonic()
        for i in range(40):
            at = begin + (0.05 * i if i < 20 else 1.0 + 0.04 * (i - 20))
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            ordered.append(asyncio.create_task(get(session, f"{urls[i % 3]}/limited?order={i}")))
        results = await asyncio.gather(*ordered)
    assert [status for status, _ in results] == [200] * 40
    stamps = arrivals.times()
    most = most_in_any_window(stamps, 1.0)
    order = [int(a.query.split("=")[1]) for a in arrivals.seen if a.query.startswith("order=")]
    waited = [seconds for _, seconds in results[21:]]
    print(
        f"\n{LIMIT}/second over 3 replicas: 90 at once took {burst_seconds:.2f} s "
        f"({90 / burst_seconds:.1f}/s), {len(stamps)} upstream arrivals, at most {most} in any "
        f"sliding 1 s window; the 19 ordered waiters waited {min(waited):.2f}-"
        f"{max(waited):.2f} s; upstream order {order}"
    )
    assert most <= LIMIT
    # The burst went at the quota, not three times it: 70 of the 90 waited for it.
    assert burst_seconds >= (90 - LIMIT) / LIMIT - 0.2
    # The waiters reached upstream in the order they came (the first twenty waited for
    # nothing, and a busy machine may swap two of them on their way).
    assert sorted(order[:20]) == list(range(20))
    assert order[20:] == list(range(20, 40))
    assert max(waited) > 0.15  # they did wait for the window to move (10 ms more each)


async def test_an_upstream_429_on_one_replica_pauses_all_three(
    redis_server: RedisServer, start_replicas: StartReplicas, upstream: FakeUpstream
) -> None:
    arrivals = Arrivals()
    upstream.handlers["/api"] = arrivals

    def slow_down(request: web.Request) -> web.Response | None:
        if request.query_string == "first":
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "2"}
            )
        return None

    arrivals.answer = slow_down
    # No rate limit of its own: nothing but the pause may hold these requests back, and each
    # replica learns of it without asking Redis on the request path.
    replicas = await start_replicas(
        3, redis_url=redis_server.url, table={"rate_limit": [], "rate_limit_max_wait": 5.0}
    )
    async with aiohttp.ClientSession() as session:
        status, _ = await get(session, f"{replicas[0].url}/api?first")
        assert status == 429
        told = time.monotonic()
        # Every replica, the one that was told and the two that were not, waits it out.
        results = await asyncio.gather(
            *(get(session, f"{replica.url}/api?after={i}") for i, replica in enumerate(replicas))
        )
    assert [status for status, _ in results] == [200] * 3
    after = [a.at - told for a in arrivals.seen if a.query.startswith("after=")]
    print(
        f"\nupstream 429 (Retry-After: 2) on one replica: the next request of each of the three "
        f"reached upstream {', '.join(f'{s:.2f}' for s in sorted(after))} s later"
    )
    assert len(after) == 3
    assert min(after) >= 1.9


@contextlib.asynccontextmanager
async def monitored(url: str) -> AsyncIterator[list[str]]:
    """The commands clients send to Redis during the block (MONITOR, less what scripts call),
    each as its name."""
    kwargs = {**parse_redis_url(url).client_kwargs(timeout=2.0), "socket_timeout": None}
    client = aioredis.Redis(**kwargs)
    seen: list[str] = []
    started = asyncio.Event()

    heard: list[str] = []
    sentinel = "token-proxy-test-end-of-block"
    ended = asyncio.Event()

    async def listen() -> None:
        async with client.monitor() as monitor:
            started.set()
            while True:
                command = await monitor.next_command()
                if command["client_type"] == "lua":
                    continue
                if sentinel in command["command"]:
                    ended.set()
                else:
                    heard.append(command["command"].split(" ", 1)[0].lower())

    # Connected before MONITOR begins, so that its handshake is not seen.
    echoer = aioredis.Redis(**parse_redis_url(url).client_kwargs(timeout=2.0))
    await echoer.ping()
    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(5):
            await started.wait()
        yield seen
        # MONITOR shows commands in the order Redis ran them: once it shows this one, it has
        # shown every command sent before.
        await echoer.echo(sentinel)
        async with asyncio.timeout(5):
            await ended.wait()
        seen.extend(heard)
    finally:
        await stop_task(task)
        await client.aclose()
        await echoer.aclose()


async def test_a_limited_request_costs_two_redis_calls_and_an_unlimited_one_none(
    redis_server: RedisServer, start_replicas: StartReplicas, upstream: FakeUpstream
) -> None:
    """What the replicas send Redis, as MONITOR sees it: acquire and settle for a request of a
    rate-limited credential, nothing for one of a credential without limits."""
    upstream.handlers["/api"] = Arrivals()
    count = 50
    calls: dict[str, list[str]] = {}
    for label, rates in (("limited", ["1000/second"]), ("unlimited", [])):
        (replica,) = await start_replicas(
            1, redis_url=redis_server.url, table={"rate_limit": rates}
        )
        async with aiohttp.ClientSession() as session:
            await get(session, f"{replica.url}/api")  # its connections are open
            async with monitored(redis_server.url) as seen:
                for _ in range(count):
                    assert (await get(session, f"{replica.url}/api"))[0] == 200
            calls[label] = list(seen)
    print(
        f"\nRedis round trips for {count} requests: "
        + ", ".join(f"{label} {len(sent)} {sorted(set(sent))}" for label, sent in calls.items())
    )
    # The replicas' presence (a script every 5 s) may add one.
    assert 2 * count <= len(calls["limited"]) <= 2 * count + 1
    assert set(calls["limited"]) == {"evalsha"}
    assert len(calls["unlimited"]) <= 1
