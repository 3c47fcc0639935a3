"""The queue of waiting requests, first come first served across every client of one store:
three replicas of a real Redis, and the memory store (one process) with the same semantics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from proxy.store.base import Claim, Counters, Rate
from proxy.store.memory import MemoryCounters
from tests.store.conftest import RedisServer, redis_store

LIMIT = [Claim(key="queued", rates=(Rate(2, 0.4),))]
HOLD = 30.0


@pytest.fixture(params=["redis", "memory"])
async def replicas(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[list[Counters]]:
    """Three replicas' counters of one store: three Redis clients, or one memory store."""
    if request.param == "memory":
        memory = MemoryCounters()
        yield [memory, memory, memory]
        return
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(redis_store(redis_server.url, prefix="queue:"))
            for _ in range(3)
        ]
        yield [store.counters for store in stores]


async def fill(counters: Counters) -> None:
    """Take and settle every slot of LIMIT."""
    for _ in range(2):
        admission = await counters.acquire(LIMIT, hold=HOLD)
        assert admission.slot is not None
        await counters.settle(admission.slot)


async def test_waiters_are_served_in_the_order_they_came_whichever_replica_they_ask(
    replicas: list[Counters],
) -> None:
    one, two, three = replicas
    await fill(one)
    first = await one.acquire(LIMIT, hold=HOLD, queue=5.0)
    second = await two.acquire(LIMIT, hold=HOLD, queue=5.0)
    third = await three.acquire(LIMIT, hold=HOLD, queue=5.0)
    tickets = [first.ticket, second.ticket, third.ticket]
    assert all(ticket is not None for ticket in tickets)
    assert len(set(tickets)) == 3
    assert first.slot is second.slot is third.slot is None
    assert all(0.0 < admission.wait <= 0.41 for admission in (first, second, third))
    # Without time to wait a newcomer gets no place, and with it a place at the back.
    assert (await two.acquire(LIMIT, hold=HOLD)).ticket is None
    await asyncio.sleep(second.wait)  # both settled entries have left: room for two
    # The third asks first, but the two before it get the two free slots.
    assert (await three.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=third.ticket)).slot is None
    assert (await two.acquire(LIMIT, hold=HOLD)).slot is None  # a newcomer cannot jump in
    granted_second = await two.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=second.ticket)
    assert granted_second.slot is not None
    assert granted_second.ticket is None
    granted_first = await one.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=first.ticket)
    assert granted_first.slot is not None
    still = await three.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=third.ticket)
    assert still.slot is None
    assert still.ticket == third.ticket
    assert still.wait > 0.3  # both slots are taken now, for a whole window once settled


async def test_a_waiter_that_leaves_gives_up_its_place(replicas: list[Counters]) -> None:
    one, two, _ = replicas
    await fill(one)
    leaving = await one.acquire(LIMIT, hold=HOLD, queue=5.0)
    staying = await two.acquire(LIMIT, hold=HOLD, queue=5.0)
    assert leaving.ticket is not None
    assert staying.ticket is not None
    await one.leave(LIMIT, leaving.ticket)
    # The one that stayed waits for one slot now, not two.
    moved = await two.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=staying.ticket)
    assert moved.slot is None
    assert moved.wait <= leaving.wait + 0.01
    await asyncio.sleep(moved.wait)
    assert (await two.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=staying.ticket)).slot


async def test_a_ticket_runs_out_with_its_wait_and_holds_nobody_back(
    replicas: list[Counters],
) -> None:
    one, two, _ = replicas
    await fill(one)
    gone = await one.acquire(LIMIT, hold=HOLD, queue=0.05)  # its holder gives up soon
    assert gone.ticket is not None
    staying = await two.acquire(LIMIT, hold=HOLD, queue=5.0)
    await asyncio.sleep(max(staying.wait, 0.05))
    # The run-out ticket no longer counts as ahead, so both slots are there for others.
    assert (await two.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=staying.ticket)).slot
    assert (await one.acquire(LIMIT, hold=HOLD)).slot
    # Its holder asking again after all queues at the back.
    late = await one.acquire(LIMIT, hold=HOLD, queue=5.0, ticket=gone.ticket)
    assert late.slot is None
    assert late.ticket == gone.ticket


async def test_waiters_far_back_are_told_the_window_they_can_have_a_slot_in(
    replicas: list[Counters],
) -> None:
    """With the window full of requests still in flight, the waiters beyond the first two
    cannot go before one window more per two places: each is told so, rather than all of
    them waking after one window to ask again."""
    one, two, three = replicas
    for _ in range(2):
        assert (await one.acquire(LIMIT, hold=HOLD)).slot is not None  # in flight, unsettled
    waits = []
    for counters in (one, two, three, one, two):
        admission = await counters.acquire(LIMIT, hold=HOLD, queue=5.0)
        assert admission.ticket is not None
        waits.append(admission.wait)
    assert [round(wait / 0.4) for wait in waits] == [1, 1, 2, 2, 3]
