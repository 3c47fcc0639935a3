"""Rate limits per credential (shared by every client) and per team client, counted in the
store's counters (proxy.store): requests wait their turn, first come first served, up to their
max wait, then get 429. An upstream 429 pauses the credential for its Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from proxy.errors import RateLimited
from proxy.store.base import Claim, Counters, Rate, Slot

# Never trust an upstream Retry-After to stall a credential for longer than this.
MAX_UPSTREAM_PAUSE = 300.0

Settle = Callable[[], Awaitable[None]]
LimitKind = Literal["credential", "client"]


class Clock(Protocol):
    """Now, in seconds, and a wait for a future that gives up after some of those seconds:
    tests inject one whose time moves only when told to."""

    def __call__(self) -> float: ...

    async def wait(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Wait until `future` is done (True) or `seconds` have passed (False); the future is
        never cancelled by the wait."""
        ...


class SystemClock:
    """The monotonic clock and the event loop's timers."""

    def __call__(self) -> float:
        return time.monotonic()

    async def wait(self, future: asyncio.Future[Any], seconds: float) -> bool:
        if future.done():
            return True
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await asyncio.shield(future)
        except TimeoutError:
            return future.done()
        return True


SYSTEM_CLOCK = SystemClock()


class RateLimiter:
    """One queue in front of a set of limits such as 100/second and 36000/hour.

    A request holds a pending slot in the store from the moment it is let through until
    upstream has answered (or failed), and only then is it counted, at that later time. So
    however long connecting takes, no window of upstream arrivals holds more than the limit.
    Requests that must wait hold a ticket in the store's queue, so that they are served in
    the order they came across every replica that shares the store, not only within this one;
    each sleeps until the store says a slot may be free for it, and asks again then."""

    def __init__(
        self,
        *,
        kind: LimitKind,
        name: str,
        key: str,
        rates: Sequence[str],
        max_wait: float,
        counters: Counters,
        hold: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.kind = kind  # which limit this is, as its refusals are counted
        self.name = name
        self.claim = Claim(key=key, rates=tuple(Rate.parse(rate) for rate in rates))
        self._claims = (self.claim,)
        self._max_wait = max_wait
        self._counters = counters
        self._hold = hold
        self._clock = clock
        # So that idle() sees at once a pause that another replica set.
        counters.watch(key)

    async def acquire(self) -> Settle:
        """Wait for a slot in every window, or raise RateLimited once it is clear that none
        frees up within max_wait. Returns the callable to await once upstream has answered."""
        if self.idle():
            return _nothing
        clock = self._clock
        deadline = clock() + self._max_wait
        ticket: str | None = None
        try:
            while True:
                admission = await self._counters.acquire(
                    self._claims,
                    hold=self._hold,
                    queue=max(0.0, deadline - clock()),
                    ticket=ticket,
                )
                ticket = admission.ticket
                if admission.slot is not None:
                    return self._settler(admission.slot)
                if clock() + admission.wait > deadline:
                    raise self._refused(admission.wait)
                # Nothing wakes this earlier: a settle never frees a slot before the window
                # moves (the entry is counted from then on), and the store's wait is never later
                # than the slot frees.
                await clock.wait(asyncio.get_running_loop().create_future(), admission.wait)
        finally:
            if ticket is not None:
                await self._counters.leave(self._claims, ticket)

    def idle(self) -> bool:
        """No limits, and no upstream 429 pause in force (this replica's or another's, as the
        store's local copy knows it): acquire would return at once. Asks nothing remote."""
        return not self.claim.rates and self._counters.pause_seen(self.claim.key) <= 0.0

    async def pause(self, seconds: float) -> float:
        """Hold every request of this limiter back for `seconds` (an upstream 429); returns
        the pause in force, which a longer one already there may exceed."""
        return await self._counters.pause(self.claim.key, min(seconds, MAX_UPSTREAM_PAUSE))

    def _settler(self, slot: Slot) -> Settle:
        async def settle() -> None:
            await self._counters.settle(slot)

        return settle

    def _refused(self, wait: float) -> RateLimited:
        return RateLimited(
            f"{self.name} is over its rate limit and no slot frees up within "
            f"{self._max_wait:g} s (rate_limit_max_wait)",
            # Whole seconds, rounded up, but not for the microsecond a window edge adds.
            retry_after=max(1, math.ceil(round(wait, 3))),
            limit=self.kind,
        )


async def _nothing() -> None:
    return None


class RateLimits:
    """The limiters of every credential and team client that has limits, over one store's
    counters. A limiter's store key is `credential:NAME` or `client:NAME` unless
    `credential_keys` names the credential's key (a shared store names it by its identity)."""

    def __init__(
        self,
        *,
        credentials: Mapping[str, tuple[Sequence[str], float]],
        clients: Mapping[str, tuple[Sequence[str], float]],
        counters: Counters,
        hold: float,
        credential_keys: Mapping[str, str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        keys = credential_keys or {}

        def build(
            kind: LimitKind, name: str, key: str, rates: Sequence[str], wait: float
        ) -> RateLimiter:
            return RateLimiter(
                kind=kind,
                name=f"{kind} {name!r}",
                key=key,
                rates=rates,
                max_wait=wait,
                counters=counters,
                hold=hold,
                clock=clock,
            )

        # Every credential gets one, limits or not, so that an upstream 429 can pause it.
        self._credentials = {
            name: build("credential", name, keys.get(name, f"credential:{name}"), rates, wait)
            for name, (rates, wait) in credentials.items()
        }
        self._clients = {
            name: build("client", name, f"client:{name}", rates, wait)
            for name, (rates, wait) in clients.items()
            if rates
        }

    def unlimited(self, *, credential: str, client: str) -> bool:
        """Whether neither limiter has anything to hold the request back for right now: the
        caller may then skip acquire and its settle."""
        return client not in self._clients and self._credentials[credential].idle()

    async def acquire(self, *, credential: str, client: str) -> Settle:
        """Wait for the client's and the credential's slots; await the result once upstream
        has answered, to count the request in their windows."""
        client_limiter = self._clients.get(client)
        if client_limiter is None:
            return await self._credentials[credential].acquire()
        settles = [await client_limiter.acquire()]
        try:
            settles.append(await self._credentials[credential].acquire())
        except BaseException:
            for settle in settles:
                await settle()
            raise

        async def settle_all() -> None:
            for settle in settles:
                await settle()

        return settle_all

    async def upstream_said_slow_down(
        self, credential: str, retry_after: str | None
    ) -> float | None:
        """Pause the credential for an upstream 429's Retry-After; returns the pause."""
        seconds = parse_retry_after(retry_after) if retry_after is not None else None
        if seconds is None:
            return None
        await self._credentials[credential].pause(seconds)
        return seconds


def parse_retry_after(value: str) -> float | None:
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date; None when it is neither."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
