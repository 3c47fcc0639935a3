"""Rate limits per credential (shared by every client) and per team client, counted by the
`limits` library's moving window: requests wait their turn, first come first served, up to
their max wait, then get 429. An upstream 429 pauses the credential for its Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.errors import RateLimited

# Never trust an upstream Retry-After to stall a credential for longer than this.
MAX_UPSTREAM_PAUSE = 300.0


class RateLimiter:
    """One queue in front of a set of limits such as 100/second and 36000/hour.

    A request holds a pending slot from the moment it is let through until upstream has
    answered (or failed), and only then is it counted in the windows, at that later time. So
    however long connecting takes, no window of upstream arrivals holds more than the limit."""

    def __init__(
        self,
        *,
        kind: Literal["credential", "client"],
        name: str,
        rates: Sequence[str],
        max_wait: float,
        strategy: MovingWindowRateLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind  # which limit this is, as its refusals are counted
        self.name = name
        self._items = tuple(limits.parse(rate) for rate in rates)
        self._max_wait = max_wait
        self._strategy = strategy
        self._clock = clock
        self._turn = asyncio.Lock()  # its waiters are served in arrival order
        self._paused_until = 0.0
        self._pending = 0
        self._settled = asyncio.Event()

    async def acquire(self) -> Callable[[], Awaitable[None]]:
        """Wait for a slot in every window, or raise RateLimited after max_wait. Returns the
        callable to await once upstream has answered."""
        if self.idle():
            return _nothing
        deadline = self._clock() + self._max_wait
        try:
            async with asyncio.timeout(self._max_wait):
                await self._turn.acquire()
        except TimeoutError:
            raise await self._refusal() from None
        try:
            while True:
                now = self._clock()
                free_at = self._paused_until
                if free_at <= now:
                    if await self._room():
                        self._pending += 1
                        return self._settle
                    free_at = await self._next_free()
                if free_at > deadline:
                    raise await self._refusal(free_at)
                # A pending request that settles may free a slot before the window moves.
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, free_at - now)):
                        await self._settled.wait()
        finally:
            self._turn.release()

    def idle(self) -> bool:
        """No limits, and no upstream 429 pause in force: acquire would return at once."""
        return not self._items and self._paused_until <= self._clock()

    def pause(self, seconds: float) -> None:
        """Hold every request of this limiter back for `seconds` (an upstream 429)."""
        until = self._clock() + min(seconds, MAX_UPSTREAM_PAUSE)
        self._paused_until = max(self._paused_until, until)

    async def _room(self) -> bool:
        cost = self._pending + 1
        for item in self._items:
            if cost > item.amount or not await self._strategy.test(item, self.name, cost=cost):
                return False
        return True

    async def _settle(self) -> None:
        # Counted in the windows before it stops being pending, so that no check in between
        # sees the request in neither.
        for item in self._items:
            await self._strategy.hit(item, self.name)
        self._pending -= 1
        self._settled.set()

    async def _next_free(self) -> float:
        now = self._clock()
        free_at = now
        for item in self._items:
            stats = await self._strategy.get_window_stats(item, self.name)
            if stats.remaining - self._pending <= 0:
                # With only pending requests in the way, the next settle frees a slot; the
                # window's own reset time bounds the wait either way.
                free_at = max(free_at, stats.reset_time if stats.remaining <= 0 else now + 1.0)
        return free_at

    async def _refusal(self, free_at: float | None = None) -> RateLimited:
        now = self._clock()
        if free_at is None:
            free_at = max(self._paused_until, await self._next_free())
        return RateLimited(
            f"{self.name} is over its rate limit and no slot frees up within "
            f"{self._max_wait:g} s (rate_limit_max_wait)",
            retry_after=max(1, math.ceil(free_at - now)),
            limit=self.kind,
        )


async def _nothing() -> None:
    return None


class RateLimits:
    """The limiters of every credential and team client that has limits."""

    def __init__(
        self,
        *,
        credentials: dict[str, tuple[Sequence[str], float]],
        clients: dict[str, tuple[Sequence[str], float]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        strategy = MovingWindowRateLimiter(MemoryStorage())

        def build(
            kind: Literal["credential", "client"], name: str, rates: Sequence[str], wait: float
        ) -> RateLimiter:
            return RateLimiter(
                kind=kind,
                name=f"{kind} {name!r}",
                rates=rates,
                max_wait=wait,
                strategy=strategy,
                clock=clock,
            )

        # Every credential gets one, limits or not, so that an upstream 429 can pause it.
        self._credentials = {
            name: build("credential", name, rates, wait)
            for name, (rates, wait) in credentials.items()
        }
        self._clients = {
            name: build("client", name, rates, wait)
            for name, (rates, wait) in clients.items()
            if rates
        }

    def unlimited(self, *, credential: str, client: str) -> bool:
        """Whether neither limiter has anything to hold the request back for right now: the
        caller may then skip acquire and its settle."""
        return client not in self._clients and self._credentials[credential].idle()

    async def acquire(self, *, credential: str, client: str) -> Callable[[], Awaitable[None]]:
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

    def upstream_said_slow_down(self, credential: str, retry_after: str | None) -> float | None:
        """Pause the credential for an upstream 429's Retry-After; returns the pause."""
        seconds = parse_retry_after(retry_after) if retry_after is not None else None
        if seconds is None:
            return None
        self._credentials[credential].pause(seconds)
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
