"""The fallback store on a real redis-server that the tests kill (SIGKILL), stop (SIGSTOP) and
start again: no call fails, none waits longer than one timeout, and sharing resumes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import cast

from proxy.store.base import ALONE, SHARED, Claim, CredentialIdentity, Rate
from proxy.store.fallback import FallbackStore
from proxy.store.redis import RedisStore
from proxy.store.redis_calls import stop_task
from proxy.store.redis_url import parse_redis_url
from tests.conftest import LEAKS, CapturedLog
from tests.store.conftest import RedisServer, wait_until

TIMEOUT = 0.2
# What a loaded two-core machine adds to one timeout before a call returns.
SLACK = 0.15
SECRET = "Fallback-Client-Secret-77a1"
IDENTITY = CredentialIdentity.of(token_url="https://oauth.example.test/token", client_id="fb")
LIMIT = Claim(key="credential", rates=(Rate(1000, 1.0),))


@contextlib.asynccontextmanager
async def fallback_store(url: str, *, prefix: str = "fb:") -> AsyncIterator[FallbackStore]:
    store = FallbackStore(
        RedisStore(parse_redis_url(url), timeout=TIMEOUT, prefix=prefix),
        probe_interval=0.1,
        presence_interval=0.2,
    )
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def _publish(store: FallbackStore, label: str) -> str:
    value = f"fallback-token-{label}-{time.monotonic_ns()}"
    LEAKS.tokens.add(value)
    now = time.time()
    await store.tokens(IDENTITY, SECRET).publish(
        value=value, obtained_at=now, expires_at=now + 60, scope=None
    )
    return value


class Traffic:
    """Calls a request would make (read the token, take and settle a slot), in a loop, each
    round timed and marked with the state the store was in when it began."""

    def __init__(self, store: FallbackStore) -> None:
        self.store = store
        self.rounds: list[tuple[float, str]] = []
        self.tokens_seen: list[str | None] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        tokens, counters = self.store.tokens(IDENTITY, SECRET), self.store.counters
        while True:
            state = self.store.state()["state"]
            started = time.monotonic()
            snapshot = await tokens.load()
            admission = await counters.acquire([LIMIT], hold=5.0)
            if admission.slot is not None:
                await counters.settle(admission.slot)
            self.rounds.append((time.monotonic() - started, state))
            self.tokens_seen.append(snapshot.token.value if snapshot.token else None)
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await stop_task(self._task)

    def slowest(self) -> float:
        return max(duration for duration, _ in self.rounds)


async def test_redis_killed_the_replica_goes_alone_at_once_and_shares_again_when_it_is_back(
    redis_server_with_password: RedisServer, proxy_log: CapturedLog
) -> None:
    server = redis_server_with_password
    async with fallback_store(server.url) as store:
        assert store.state()["state"] == SHARED
        assert store.store_up() == 1
        value = await _publish(store, "before")
        async with Traffic(store) as traffic:
            await wait_until(lambda: len(traffic.rounds) > 20)
            server.kill()
            await wait_until(lambda: store.state()["state"] == ALONE, timeout=TIMEOUT + SLACK)
            count = len(traffic.rounds)
            await wait_until(lambda: len(traffic.rounds) > count + 50, timeout=5)
            assert store.store_up() == 0
            assert store.errors().get("connection", 0) >= 1
            # Alone, the replica still has the token it last saw in Redis.
            assert traffic.tokens_seen[-1] == value
            await server.restart()
            await wait_until(lambda: store.state()["state"] == SHARED, timeout=10)
            count = len(traffic.rounds)
            await wait_until(lambda: len(traffic.rounds) > count + 20, timeout=5)
        print(f"Redis killed: slowest round {traffic.slowest():.3f} s of {len(traffic.rounds)}")
        assert traffic.slowest() <= TIMEOUT + SLACK
        alone = [duration for duration, state in traffic.rounds if state == ALONE]
        assert alone
        assert max(alone) < 0.05  # nothing is spent on the dead Redis
        assert store.store_up() == 1
        # Shared again: what it publishes is in the new Redis.
        fresh = await _publish(store, "after")
        assert store.shared_store is not None
        loaded = await store.shared_store.tokens(IDENTITY, SECRET).load()
        assert loaded.token is not None
        assert loaded.token.value == fresh
        state = store.state()
    warnings = [
        line for line in proxy_log.lines(min_level="warning") if "goes on alone" in line["event"]
    ]
    assert len(warnings) == 1
    assert any("sharing resumed" in line["event"] for line in proxy_log.lines())
    assert server.password is not None
    assert server.password not in proxy_log.text()
    assert server.password not in json.dumps(state)
    assert set(state) >= {"backend", "state", "since", "replicas", "errors", "last_error"}
    assert state["backend"] == "redis"


async def test_redis_stopped_each_call_costs_at_most_one_timeout(
    redis_server: RedisServer,
) -> None:
    async with fallback_store(redis_server.url) as store:
        tokens = store.tokens(IDENTITY, SECRET)
        await _publish(store, "stop")
        waiter_generation = (await tokens.load()).generation
        waiter = asyncio.create_task(tokens.wait_changed(waiter_generation))
        async with Traffic(store) as traffic:
            await wait_until(lambda: len(traffic.rounds) > 20)
            redis_server.stop()
            stopped_at = time.monotonic()
            # Calls already under way each wait one timeout, in parallel, then go alone.
            started = time.monotonic()
            results = await asyncio.gather(*(tokens.load() for _ in range(10)))
            assert time.monotonic() - started <= TIMEOUT + SLACK
            assert all(result.token is not None for result in results)
            await wait_until(lambda: store.state()["state"] == ALONE, timeout=TIMEOUT + SLACK)
            # A waiter on Redis is told to read again, from memory now.
            async with asyncio.timeout(TIMEOUT + SLACK):
                await waiter
            assert time.monotonic() - stopped_at <= TIMEOUT + SLACK
            assert store.errors().get("timeout", 0) >= 1
            count = len(traffic.rounds)
            await wait_until(lambda: len(traffic.rounds) > count + 50, timeout=5)
            redis_server.cont()
            await wait_until(lambda: store.state()["state"] == SHARED, timeout=10)
            count = len(traffic.rounds)
            await wait_until(lambda: len(traffic.rounds) > count + 20, timeout=5)
        print(f"Redis stopped: slowest round {traffic.slowest():.3f} s of {len(traffic.rounds)}")
        assert traffic.slowest() <= TIMEOUT + SLACK


async def test_redis_down_at_start_up_is_no_error_and_sharing_begins_when_it_answers(
    redis_server: RedisServer, proxy_log: CapturedLog
) -> None:
    redis_server.kill()
    started = time.monotonic()
    async with fallback_store(redis_server.url) as store:
        assert time.monotonic() - started <= TIMEOUT + SLACK
        assert store.state()["state"] == ALONE
        tokens = store.tokens(IDENTITY, SECRET)
        owner = await tokens.lock(10.0)  # alone: the lock is this process's own
        assert owner is not None
        await redis_server.restart()
        await wait_until(lambda: store.state()["state"] == SHARED, timeout=10)
        # The lock taken alone is released where it was taken.
        assert await tokens.unlock(owner)
        shared_owner = await tokens.lock(10.0)
        assert shared_owner is not None
        assert await tokens.lock(10.0) is None
        assert await tokens.unlock(shared_owner)
    events = [line["event"] for line in proxy_log.lines(min_level="info")]
    assert sum("does not answer at start-up" in event for event in events) == 1
    assert sum("sharing resumed" in event for event in events) == 1


async def test_alone_each_replica_keeps_to_its_share_of_a_limit(
    redis_server: RedisServer,
) -> None:
    limit = [Claim(key="credential", rates=(Rate(10, 1.0), Rate(3600, 3600.0)))]
    async with (
        fallback_store(redis_server.url, prefix="share:") as one,
        fallback_store(redis_server.url, prefix="share:") as two,
    ):
        await wait_until(lambda: one.replicas == 2 and two.replicas == 2, timeout=5)
        redis_server.kill()
        admitted = 0
        while (await one.counters.acquire(limit, hold=5.0)).slot is not None:
            admitted += 1
        assert one.state()["state"] == ALONE
        assert admitted == 5
        assert await one.counters.next_free(limit) > 0


async def test_slots_finished_while_redis_was_away_are_settled_there_when_it_answers(
    redis_server: RedisServer,
) -> None:
    """A request let through by Redis whose answer came while Redis was stopped does not hold
    its place there for its whole hold: once Redis answers, it is counted there, at the time
    upstream answered it."""
    limit = [Claim(key="late", rates=(Rate(5, 60.0),))]
    async with fallback_store(redis_server.url, prefix="late:") as store:
        slots = [(await store.counters.acquire(limit, hold=600.0)).slot for _ in range(2)]
        assert all(slot is not None and slot.origin == "redis" for slot in slots)
        redis_server.stop()
        answered_at = time.time()
        for slot in slots:
            assert slot is not None
            await store.counters.settle(slot)  # the first times out; both are kept
        assert store.state()["state"] == ALONE
        redis_server.cont()
        await wait_until(lambda: store.state()["state"] == SHARED, timeout=10)
        shared = store.shared_store
        await wait_until(
            lambda: _zcard(shared, shared.counters.key("late", "pending"), 0), timeout=5
        )
        stamps = cast(
            list[tuple[bytes, float]],
            await shared.client.zrange(shared.counters.key("late", "hits"), 0, -1, withscores=True),
        )
        assert len(stamps) == 2
        for _, micros in stamps:
            assert abs(micros / 1_000_000 - answered_at) < 0.5
        # Three places are left of five, not one.
        admitted = 0
        while (await store.counters.acquire(limit, hold=600.0)).slot is not None:
            admitted += 1
        assert admitted == 3


async def _zcard(store: RedisStore, key: str, expected: int) -> bool:
    return int(await store.client.zcard(key)) == expected


async def test_alone_a_replica_keeps_to_the_pauses_other_replicas_announced(
    redis_server: RedisServer,
) -> None:
    free = [Claim(key="paused", rates=())]
    async with (
        fallback_store(redis_server.url, prefix="pause:") as one,
        fallback_store(redis_server.url, prefix="pause:") as two,
    ):
        two.counters.watch("paused")
        await one.counters.pause("paused", 30.0)
        await wait_until(lambda: two.counters.pause_seen("paused") > 20, timeout=2)
        redis_server.kill()
        refused = await two.counters.acquire(free, hold=5.0)  # finds Redis gone: alone
        assert two.state()["state"] == ALONE
        refused = await two.counters.acquire(free, hold=5.0)
        assert refused.slot is None
        assert refused.wait > 20


async def test_a_token_fetched_alone_goes_to_redis_when_it_answers_again(
    redis_server: RedisServer,
) -> None:
    """Redis killed and started again empty: the token a replica published alone meanwhile is
    the one Redis holds once the replica shares again, and another replica takes it, so that
    sharing resumes without a token request in each. A token Redis holds that outlives it
    stays; one dropped since is never published again."""
    async with fallback_store(redis_server.url) as one, fallback_store(redis_server.url) as two:
        await _publish(one, "before")
        redis_server.kill()
        await wait_until(lambda: one.state()["state"] == ALONE, timeout=5)
        await one.tokens(IDENTITY, SECRET).load()  # fails over, if the probe was not first
        alone = await _publish(one, "alone")
        await redis_server.restart()
        await wait_until(lambda: one.state()["state"] == SHARED, timeout=10)
        snapshot = await one.tokens(IDENTITY, SECRET).load()
        assert snapshot.token is not None
        assert snapshot.token.value == alone
        await wait_until(lambda: two.state()["state"] == SHARED, timeout=10)
        taken = await two.tokens(IDENTITY, SECRET).load()
        assert taken.token is not None
        assert taken.token.value == alone
        # Once Redis has it, it is not published again: a drop there is final.
        tokens = one.tokens(IDENTITY, SECRET)
        assert await tokens.drop(taken.token.version)
        assert (await tokens.load()).token is None
        assert (await two.tokens(IDENTITY, SECRET).load()).token is None


async def test_settles_that_shared_a_failed_call_count_one_error_and_are_all_kept(
    redis_server: RedisServer,
) -> None:
    limit = (Claim(key="shared-call", rates=(Rate(100, 60.0),)),)
    async with fallback_store(redis_server.url, prefix="batch:") as store:
        slots = [(await store.counters.acquire(limit, hold=600.0)).slot for _ in range(5)]
        redis_server.stop()
        try:
            await asyncio.gather(*(store.counters.settle(slot) for slot in slots if slot))
            assert store.state()["state"] == ALONE
            assert store.errors() == {"timeout": 1}
        finally:
            redis_server.cont()
        await wait_until(lambda: store.state()["state"] == SHARED, timeout=10)
        shared = store.shared_store
        hits = shared.counters.key("shared-call", "hits")
        await wait_until(lambda: _zcard(shared, hits, 5), timeout=5)
