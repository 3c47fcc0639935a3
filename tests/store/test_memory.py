"""The in-memory store, on an injected clock: token state, the pending-slot counters (checked
against the `limits` library's moving window where both apply) and the pauses."""

from __future__ import annotations

import asyncio
import random
import types

import limits
import pytest
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.store.base import Claim, CredentialIdentity, FetchFailure, Rate
from proxy.store.memory import FAILURE_MEMORY, MemoryCounters, MemoryStore, MemoryTokens


class Clock:
    """Wall-clock time that a test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claim(key: str, *rates: str) -> Claim:
    return Claim(key=key, rates=tuple(Rate.parse(rate) for rate in rates))


async def test_the_same_credential_gets_the_same_token_store() -> None:
    store = MemoryStore()
    one = CredentialIdentity.of(token_url="https://t/token", client_id="id", scope="b a")
    two = CredentialIdentity.of(token_url="https://t/token", client_id="id", scope="a b a")
    other = CredentialIdentity.of(token_url="https://t/token", client_id="id2")
    assert one.digest == two.digest != other.digest
    assert store.tokens(one, "s") is store.tokens(two, "s")
    assert store.tokens(one, "s") is not store.tokens(other, "s")
    assert "id" not in one.digest
    assert store.state() == {"backend": "memory"}


async def test_tokens_publish_drop_once_and_expire() -> None:
    clock = Clock()
    tokens = MemoryTokens(clock=clock)
    first = await tokens.publish(
        value="t1", obtained_at=clock.now, expires_at=clock.now + 10, scope=None
    )
    snapshot = await tokens.load()
    assert snapshot.token == first
    results = await asyncio.gather(tokens.drop(first.version), tokens.drop(first.version))
    assert sorted(results) == [False, True]
    second = await tokens.publish(
        value="t2", obtained_at=clock.now, expires_at=clock.now + 10, scope=None
    )
    assert not await tokens.drop(first.version)
    assert (await tokens.load()).token == second
    clock.now += 10
    assert (await tokens.load()).token is None


async def test_the_failure_state_lasts_past_its_retry_and_a_token_clears_it() -> None:
    clock = Clock()
    tokens = MemoryTokens(clock=clock)
    failure = FetchFailure(failures=2, error="timeout", retry_at=clock.now + 4)
    await tokens.record_failure(failure)
    clock.now += 4 + FAILURE_MEMORY - 1
    assert (await tokens.load()).failure == failure
    await tokens.publish(value="t", obtained_at=clock.now, expires_at=clock.now + 60, scope=None)
    assert (await tokens.load()).failure is None
    await tokens.record_failure(failure)
    clock.now += FAILURE_MEMORY + 1
    assert (await tokens.load()).failure is None


async def test_the_lock_has_one_owner_and_frees_itself() -> None:
    clock = Clock()
    tokens = MemoryTokens(clock=clock)
    owners = await asyncio.gather(*(tokens.lock(5.0) for _ in range(10)))
    held = [owner for owner in owners if owner is not None]
    assert len(held) == 1
    assert not await tokens.unlock("someone-else")
    assert await tokens.unlock(held[0])
    assert not await tokens.unlock(held[0])
    dead = await tokens.lock(5.0)
    assert dead is not None
    clock.now += 5
    assert await tokens.lock(5.0) is not None
    assert not await tokens.unlock(dead)


async def test_a_waiter_wakes_on_each_change() -> None:
    clock = Clock()
    tokens = MemoryTokens(clock=clock)
    start = (await tokens.load()).generation
    waiter = asyncio.create_task(tokens.wait_changed(start))
    await asyncio.sleep(0)
    assert not waiter.done()
    await tokens.publish(value="t", obtained_at=clock.now, expires_at=clock.now + 9, scope=None)
    async with asyncio.timeout(1):
        await waiter
    owner = await tokens.lock(1.0)
    assert owner is not None
    generation = (await tokens.load()).generation
    waiter = asyncio.create_task(tokens.wait_changed(generation))
    await tokens.unlock(owner)
    async with asyncio.timeout(1):
        await waiter
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await tokens.wait_changed((await tokens.load()).generation)


async def test_a_refusing_path_is_forgotten_after_its_time() -> None:
    clock = Clock()
    tokens = MemoryTokens(clock=clock)
    await tokens.remember_refusing("/user", 10)
    assert await tokens.refuses("/user")
    assert not await tokens.refuses("/other")
    clock.now += 10
    assert not await tokens.refuses("/user")


async def test_a_pending_slot_counts_from_admission_and_is_counted_when_settled() -> None:
    clock = Clock()
    counters = MemoryCounters(clock=clock)
    two = [claim("c", "2/second")]
    first = (await counters.acquire(two, hold=30)).slot
    second = (await counters.acquire(two, hold=30)).slot
    assert first is not None
    assert second is not None
    refused = await counters.acquire(two, hold=30)
    assert refused.slot is None
    assert refused.wait == pytest.approx(1.0)  # both pending: at least one window from now
    clock.now += 0.5
    await counters.settle(first)
    clock.now += 0.1
    await counters.settle(second)
    # Counted at 0.5 and 0.6: the first leaves the window just after 1.5.
    assert (await counters.acquire(two, hold=30)).wait == pytest.approx(0.9, abs=1e-5)
    assert counters.counted("c") == [clock.now - 0.1, clock.now]
    clock.now += 0.9
    assert (await counters.acquire(two, hold=30)).slot is None  # at the edge it still counts
    clock.now += 2e-6
    assert (await counters.acquire(two, hold=30)).slot is not None


async def test_a_slot_released_is_not_counted_and_one_never_settled_expires() -> None:
    clock = Clock()
    counters = MemoryCounters(clock=clock)
    one = [claim("c", "1/minute")]
    slot = (await counters.acquire(one, hold=2)).slot
    assert slot is not None
    await counters.release(slot)
    assert counters.counted("c") == []
    lost = (await counters.acquire(one, hold=2)).slot
    assert lost is not None
    assert (await counters.acquire(one, hold=2)).slot is None
    clock.now += 2  # its replica died mid-request
    assert (await counters.acquire(one, hold=2)).slot is not None


async def test_every_limit_of_every_claim_is_taken_at_once_or_not_at_all() -> None:
    clock = Clock()
    counters = MemoryCounters(clock=clock)
    client = claim("client", "10/second")
    credential = claim("credential", "5/second", "7/minute")
    for _ in range(7):
        slot = (await counters.acquire([client, credential], hold=30)).slot
        assert slot is not None
        await counters.settle(slot)
        clock.now += 0.3
    # The second limit of the credential is full, and with it the whole acquire: the client's
    # limit gets no entry either.
    refused = await counters.acquire([client, credential], hold=30)
    assert refused.slot is None
    assert refused.wait == pytest.approx(60 - 7 * 0.3 + 1e-6, abs=1e-5)
    assert await counters.next_free([client, credential]) == pytest.approx(refused.wait)
    # Three of the client's entries are still in its one-second window, and no pending one
    # was left behind by the refused acquire: seven more fit.
    assert len(counters.counted("client")) == 3
    admitted = 0
    while (await counters.acquire([client], hold=30)).slot is not None:
        admitted += 1
    assert admitted == 7


async def test_a_pause_holds_its_key_back_and_only_grows() -> None:
    clock = Clock()
    counters = MemoryCounters(clock=clock)
    assert await counters.pause("credential", 3) == pytest.approx(3)
    assert await counters.pause("credential", 1) == pytest.approx(3)
    clock.now += 1
    assert await counters.pause_left("credential") == pytest.approx(2)
    refused = await counters.acquire([Claim(key="credential", rates=())], hold=30)
    assert refused.slot is None
    assert refused.wait == pytest.approx(2)
    assert (await counters.acquire([claim("other", "1/second")], hold=30)).slot is not None
    clock.now += 2
    assert await counters.pause_left("credential") == 0.0


async def test_counters_admit_what_the_limits_moving_window_admits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every request settled as it is admitted, these counters are the library's moving
    window: the same requests of a random sequence get through."""
    clock = Clock()
    monkeypatch.setattr(
        "limits.aio.storage.memory.time", types.SimpleNamespace(time=clock), raising=True
    )
    storage = MemoryStorage()
    library = MovingWindowRateLimiter(storage)
    ours = MemoryCounters(clock=clock)
    texts = ["5/second", "12/10 seconds"]
    items = [limits.parse(text) for text in texts]
    rng = random.Random(20240601)  # noqa: S311  # a reproducible sequence, not a secret
    admitted_ours, admitted_library = [], []
    for step in range(600):
        clock.now += rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 1.0])
        slot = (await ours.acquire([claim("k", *texts)], hold=30)).slot
        if slot is not None:
            await ours.settle(slot)
            admitted_ours.append(step)
        # Test every limit first, then hit them all, as an atomic acquire would.
        if all([await library.test(item, "k") for item in items]):
            for item in items:
                assert await library.hit(item, "k")
            admitted_library.append(step)
    assert admitted_ours == admitted_library
    assert 100 < len(admitted_ours) < 600


async def test_a_mirror_takes_on_another_stores_state_as_it_is() -> None:
    clock = Clock()
    source, mirror = MemoryTokens(clock=clock), MemoryTokens(clock=clock)
    await source.publish(value="t", obtained_at=clock.now, expires_at=clock.now + 60, scope=None)
    mirror.mirror(await source.load())
    generation = (await mirror.load()).generation
    assert (await mirror.load()).token == (await source.load()).token
    mirror.mirror(await source.load())  # nothing new: no change to wake anyone for
    assert (await mirror.load()).generation == generation
    token = (await source.load()).token
    assert token is not None
    await source.drop(token.version)
    mirror.mirror(await source.load())
    assert (await mirror.load()).token is None
    assert (await mirror.load()).generation > generation
