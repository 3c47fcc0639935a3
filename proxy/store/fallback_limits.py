"""The fallback store's rate limits and 429 pauses: counted in Redis while it answers, in this
process's memory at this replica's share of each limit while it does not, and what Redis could
not be told (slots finished while it was away, entries a timed-out call may yet leave there)
put right once it answers again."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.errors import StoreUnavailable
from proxy.store.base import Admission, Claim, Rate, Slot
from proxy.store.memory import MemoryCounters
from proxy.store.redis_limits import ORIGIN as REDIS_ORIGIN
from proxy.store.redis_limits import RedisCounters

if TYPE_CHECKING:
    from proxy.store.fallback import FallbackStore

# Slots taken in Redis and finished while it was away, kept to settle there later. Beyond this
# many the oldest are forgotten: their pending entries stop counting after their hold.
UNFINISHED_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class _Unfinished:
    slot: Slot
    settle: bool  # else release it, and its ticket
    at: float  # monotonic: when upstream answered (or the request gave up)


class FallbackCounters:
    """Rate limits and pauses: Redis's, or memory's at this replica's share while alone."""

    def __init__(self, store: FallbackStore) -> None:
        self._store = store
        self._shares: dict[tuple[Claim, int], Claim] = {}
        self._unfinished: list[_Unfinished] = []
        self._failed: StoreUnavailable | None = None

    @property
    def _shared(self) -> RedisCounters:
        return self._store.shared_store.counters

    @property
    def _local(self) -> MemoryCounters:
        return self._store.local_store.counters

    def share(self, claims: Sequence[Claim]) -> list[Claim]:
        """This replica's share of each claim while alone."""
        ways = self._store.replicas
        if ways <= 1:
            return list(claims)
        shares = []
        for claim in claims:
            share = self._shares.get((claim, ways))
            if share is None:
                rates = tuple(
                    Rate(max(1, rate.amount // ways), rate.seconds) for rate in claim.rates
                )
                share = self._shares[(claim, ways)] = Claim(key=claim.key, rates=rates)
            shares.append(share)
        return shares

    async def acquire(
        self,
        claims: Sequence[Claim],
        *,
        hold: float,
        queue: float = 0.0,
        ticket: str | None = None,
    ) -> Admission:
        # A ticket names its store; after a switch the request queues again in the other one.
        where, _, inner = (ticket or "").partition(":")
        store = self._store
        if store.is_shared:
            # A fresh id is a newcomer's ticket as good as none; named here so that, should
            # the call time out, the entry it may still leave in Redis can be taken back.
            shared = self._shared
            entry = inner if where == "r" else shared.new_entry()
            try:
                admission = await shared.acquire(claims, hold=hold, queue=queue, ticket=entry)
            except StoreUnavailable as exc:
                # A stalled Redis runs the script once it goes on, for nobody.
                self._keep(_Unfinished(Slot(entry, tuple(claims), REDIS_ORIGIN), False, 0.0))
                store.failed(exc)
            else:
                return admission if admission.ticket is None else _marked(admission, "r")
        for claim in claims:
            # Pauses that other replicas announced hold here too.
            seen = self._shared.pause_seen(claim.key)
            if seen > 0:
                self._local.install_pause(claim.key, seen)
        admission = await self._local.acquire(
            self.share(claims), hold=hold, queue=queue, ticket=inner if where == "m" else None
        )
        return _marked(admission, "m")

    async def leave(self, claims: Sequence[Claim], ticket: str) -> None:
        where, _, inner = ticket.partition(":")
        if where == "m":
            await self._local.leave(self.share(claims), inner)
        elif self._store.is_shared:  # else it runs out in Redis by itself
            try:
                await self._shared.leave(claims, inner)
            except StoreUnavailable as exc:
                self._store.failed(exc)

    async def _finish(self, slot: Slot, *, settle: bool) -> None:
        if slot.origin != REDIS_ORIGIN:
            await (self._local.settle(slot) if settle else self._local.release(slot))
            return
        if self._store.is_shared:
            try:
                await (self._shared.settle(slot) if settle else self._shared.release(slot))
            except StoreUnavailable as exc:
                # Settles share a call (RedisCounters.settle): its failure is counted once.
                if exc is not self._failed:
                    self._failed = exc
                    self._store.failed(exc)
            else:
                return
        # Left pending in Redis, that slot would hold a place for its whole hold.
        self._keep(_Unfinished(slot, settle, time.monotonic()))

    def _keep(self, unfinished: _Unfinished) -> None:
        self._unfinished.append(unfinished)
        del self._unfinished[:-UNFINISHED_KEPT]

    async def resume(self) -> None:
        """Redis answers again: settle (or release) there what finished while it was away,
        each counted at the time upstream answered it. Stops at the first failure."""
        while self._unfinished and self._store.is_shared:
            done = self._unfinished[0]
            try:
                if done.settle:
                    await self._shared.settle(done.slot, ago=time.monotonic() - done.at)
                else:
                    await self._shared.release(done.slot)
                    await self._shared.leave(done.slot.claims, done.slot.id)
            except StoreUnavailable as exc:
                self._store.failed(exc)
                return
            self._unfinished.pop(0)

    async def settle(self, slot: Slot) -> None:
        await self._finish(slot, settle=True)

    async def release(self, slot: Slot) -> None:
        await self._finish(slot, settle=False)

    async def next_free(self, claims: Sequence[Claim]) -> float:
        return await self._store.run(
            lambda: self._shared.next_free(claims),
            lambda: self._local.next_free(self.share(claims)),
        )

    async def pause(self, key: str, seconds: float) -> float:
        async def shared() -> float:
            left: float = await self._shared.pause(key, seconds)
            self._local.install_pause(key, left)
            return left

        return await self._store.run(shared, lambda: self._local.pause(key, seconds))

    def pause_seen(self, key: str) -> float:
        # Redis's copy holds what other replicas announced, and stays true while alone: a
        # pause only runs out.
        return max(self._shared.pause_seen(key), self._local.pause_seen(key))

    def watch(self, key: str) -> None:
        self._shared.watch(key)

    async def pause_left(self, key: str) -> float:
        return await self._store.run(
            lambda: self._shared.pause_left(key), lambda: self._local.pause_left(key)
        )


def _marked(admission: Admission, where: str) -> Admission:
    if admission.ticket is None:
        return admission
    return replace(admission, ticket=f"{where}:{admission.ticket}")
