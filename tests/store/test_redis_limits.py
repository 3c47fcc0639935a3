"""Rate limits and pauses shared through a real Redis by several store clients (replicas)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
from typing import cast

import redis.asyncio as aioredis

from proxy.store.base import Claim, Rate
from proxy.store.redis import RedisStore
from tests.store.conftest import RedisServer, redis_store, wait_until

PREFIX = "limits:"


def claim(key: str, *rates: str) -> Claim:
    return Claim(key=key, rates=tuple(Rate.parse(rate) for rate in rates))


async def redis_now(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return float(seconds) + micros / 1_000_000


async def scores(client: aioredis.Redis, key: str) -> list[float]:
    pairs = cast(list[tuple[bytes, float]], await client.zrange(key, 0, -1, withscores=True))
    return sorted(score / 1_000_000 for _, score in pairs)


def most_in_any_window(stamps: list[float], seconds: float) -> int:
    """The most entries in any half-open window [t, t + seconds)."""
    return max(
        (bisect.bisect_left(stamps, start + seconds) - i for i, start in enumerate(stamps)),
        default=0,
    )


async def test_twenty_per_second_across_three_replicas_holds_in_every_sliding_window(
    redis_server: RedisServer,
) -> None:
    limit = [claim("credential", "20/second", "100000/hour")]  # the hour keeps every stamp
    rng = random.Random(7)  # noqa: S311  # upstream delays, not secrets
    granted = 0
    refused_waits: list[float] = []

    async def replica(store: RedisStore, stop_at: float) -> None:
        nonlocal granted
        while time.monotonic() < stop_at:
            admission = await store.counters.acquire(limit, hold=5.0)
            if admission.slot is None:
                refused_waits.append(admission.wait)
                await asyncio.sleep(admission.wait)
                continue
            granted += 1
            await asyncio.sleep(rng.uniform(0.0, 0.04))  # upstream takes its time to answer
            await store.counters.settle(admission.slot)

    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(redis_store(redis_server.url, prefix=PREFIX))
            for _ in range(3)
        ]
        stop_at = time.monotonic() + 2.5
        await asyncio.gather(*(replica(store, stop_at) for store in stores for _ in range(8)))
        client = stores[0].client
        stamps = await scores(client, stores[0].counters.key("credential", "hits"))
        pending = await client.zcard(stores[0].counters.key("credential", "pending"))
    print(
        f"20/second over 3 replicas: {granted} granted in 2.5 s, at most "
        f"{most_in_any_window(stamps, 1.0)} in any 1-second window"
    )
    assert pending == 0
    assert len(stamps) == granted
    assert most_in_any_window(stamps, 1.0) <= 20
    # Held at the limit, not far below it: 2.5 s at 20/s, less the first second's start.
    assert granted >= 45
    assert refused_waits
    assert all(0 < wait <= 1.0 for wait in refused_waits)


async def test_every_limit_of_every_claim_is_taken_at_once_or_not_at_all(
    redis_server: RedisServer,
) -> None:
    client_limit = claim("client", "10/second")
    credential = claim("credential", "5/second", "7/minute")
    async with (
        redis_store(redis_server.url, prefix=PREFIX) as one,
        redis_store(redis_server.url, prefix=PREFIX) as two,
    ):
        results = await asyncio.gather(
            *(
                (one, two)[i % 2].counters.acquire([client_limit, credential], hold=30)
                for i in range(12)
            )
        )
        slots = [result.slot for result in results if result.slot is not None]
        # All pending at once: the smaller limit of the credential decides.
        assert len(slots) == 5
        refused = [result for result in results if result.slot is None]
        assert all(0.9 < result.wait <= 60 for result in refused)
        for slot in slots:
            await one.counters.settle(slot)
        redis = one.client
        for part, expected in (("hits", 5), ("pending", 0)):
            for limiter in ("client", "credential"):
                assert await redis.zcard(one.counters.key(limiter, part)) == expected
        await wait_until(
            lambda: _admitted(two, [client_limit, credential]),
            timeout=5,
        )
        # Seven in the minute: the eighth waits for the minute, whatever the second says.
        assert (await two.counters.acquire([client_limit, credential], hold=30)).slot is not None
        refused_by_minute = await two.counters.acquire([client_limit, credential], hold=30)
        assert refused_by_minute.slot is None
        assert refused_by_minute.wait > 50
        assert await two.counters.next_free([client_limit, credential]) > 50
        # Nothing of the refused acquires stayed behind in the client's limit.
        assert await redis.zcard(one.counters.key("client", "pending")) == 2


async def _admitted(store: RedisStore, claims: list[Claim]) -> bool:
    return (await store.counters.acquire(claims, hold=30)).slot is not None


async def test_a_slot_is_counted_when_it_is_settled_not_when_it_was_granted(
    redis_server: RedisServer,
) -> None:
    limit = [claim("credential", "3/second")]
    async with redis_store(redis_server.url, prefix=PREFIX) as store:
        granted_at = await redis_now(store.client)
        slot = (await store.counters.acquire(limit, hold=30)).slot
        assert slot is not None
        await asyncio.sleep(0.2)
        await store.counters.settle(slot)
        settled_at = await redis_now(store.client)
        (stamp,) = await scores(store.client, store.counters.key("credential", "hits"))
        assert granted_at + 0.2 <= stamp <= settled_at
        released = (await store.counters.acquire(limit, hold=30)).slot
        assert released is not None
        await store.counters.release(released)
        assert len(await scores(store.client, store.counters.key("credential", "hits"))) == 1
        assert await store.client.zcard(store.counters.key("credential", "pending")) == 0


async def test_the_pending_slot_of_a_replica_that_died_stops_counting(
    redis_server: RedisServer,
) -> None:
    limit = [claim("credential", "1/minute")]
    async with redis_store(redis_server.url, prefix=PREFIX) as survivor:
        async with redis_store(redis_server.url, prefix=PREFIX) as doomed:
            taken_at = time.monotonic()
            assert (await doomed.counters.acquire(limit, hold=0.3)).slot is not None
        refused = await survivor.counters.acquire(limit, hold=30)
        assert refused.slot is None
        await wait_until(lambda: _admitted(survivor, limit), timeout=5)
        assert time.monotonic() - taken_at >= 0.29


async def test_an_upstream_429_pauses_every_replica(redis_server: RedisServer) -> None:
    async with (
        redis_store(redis_server.url, prefix=PREFIX) as one,
        redis_store(redis_server.url, prefix=PREFIX) as two,
    ):
        await wait_until(two.events.subscribed.is_set)
        assert await two.counters.pause_left("credential") == 0.0  # now known to `two`
        assert await one.counters.pause("credential", 1.0) == 1.0
        # `two` hears of it through the subscription, without asking Redis again.
        await wait_until(lambda: _paused(two, "credential", 0.5), timeout=2)
        refused = await two.counters.acquire([claim("credential", "100/second")], hold=30)
        assert refused.slot is None
        assert 0.5 < refused.wait <= 1.0
        # A pause only ever grows.
        assert await two.counters.pause("credential", 0.1) > 0.5
        assert (await two.counters.acquire([claim("other", "100/second")], hold=30)).slot
        await wait_until(lambda: _admitted(two, [claim("credential", "100/second")]), timeout=3)
        assert await two.counters.pause_left("credential") == 0.0


async def _paused(store: RedisStore, key: str, at_least: float) -> bool:
    return await store.counters.pause_left(key) > at_least


async def test_a_watched_pause_is_seen_without_a_wait_set_before_or_after_subscribing(
    redis_server: RedisServer,
) -> None:
    """pause_seen answers from the local copy: a pause set by another replica before this one
    started is read once it subscribes, and one set after arrives through the subscription."""
    async with redis_store(redis_server.url, prefix=PREFIX) as one:
        await one.counters.pause("early", 2.0)
        async with redis_store(redis_server.url, prefix=PREFIX) as two:
            two.counters.watch("early")
            two.counters.watch("late")
            assert two.counters.pause_seen("late") == 0.0
            await wait_until(lambda: two.counters.pause_seen("early") > 1.0, timeout=2)
            await one.counters.pause("late", 1.0)
            await wait_until(lambda: two.counters.pause_seen("late") > 0.5, timeout=2)
            assert two.counters.pause_seen("unwatched") == 0.0


async def _evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_settles_asked_for_together_go_to_redis_in_one_call(
    redis_server: RedisServer,
) -> None:
    """Upstream answers many requests in one turn of the event loop under load: their settles
    share one script call, and each is counted all the same, also one whose caller gave up."""
    limit = (claim("together", "1000/second"),)
    async with redis_store(redis_server.url, prefix=PREFIX) as store:
        counters = store.counters
        slots = [(await counters.acquire(limit, hold=30)).slot for _ in range(21)]
        assert all(slot is not None for slot in slots)
        before = await _evalsha_calls(store.client)
        settles = [asyncio.create_task(counters.settle(slot)) for slot in slots if slot]
        await asyncio.sleep(0)  # each has asked for its settle
        settles[0].cancel()  # that caller gave up: its request was still upstream's
        await asyncio.gather(*settles[1:])
        with contextlib.suppress(asyncio.CancelledError):
            await settles[0]
        assert await _evalsha_calls(store.client) - before == 1
        hits, pending = (counters.key("together", part) for part in ("hits", "pending"))
        await wait_until(lambda: _count(store.client, hits, 21))
        assert await store.client.zcard(pending) == 0


async def _count(client: aioredis.Redis, key: str, expected: int) -> bool:
    return int(await client.zcard(key)) == expected
