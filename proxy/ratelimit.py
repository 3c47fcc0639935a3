"""Rate limits per credential (shared by every client) and per team client, counted by the
`limits` library's moving window: requests wait their turn, first come first served, up to
their max wait, then get 429. An upstream 429 pauses the credential for its Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Callable, Sequence

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.errors import RateLimited

# Never trust an upstream Retry-After to stall a credential for longer than this.
MAX_UPSTREAM_PAUSE = 300.0


class RateLimiter:
    """One queue in front of a set of limits such as 100/second and 36000/hour."""

    def __init__(
        self,
        *,
        name: str,
        rates: Sequence[str],
        max_wait: float,
        strategy: MovingWindowRateLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._items = tuple(limits.parse(rate) for rate in rates)
        self._max_wait = max_wait
        self._strategy = strategy
        self._clock = clock
        self._turn = asyncio.Lock()  # its waiters are served in arrival order
        self._paused_until = 0.0

    async def acquire(self) -> None:
        """Wait for a free slot in every window, or raise RateLimited after max_wait."""
        if not self._items and self._paused_until <= self._clock():
            return
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
                    if await self._take():
                        return
                    free_at = await self._next_free()
                if free_at > deadline:
                    raise await self._refusal(free_at)
                await asyncio.sleep(max(0.0, free_at - now))
        finally:
            self._turn.release()

    def pause(self, seconds: float) -> None:
        """Hold every request of this limiter back for `seconds` (an upstream 429)."""
        self._paused_until = max(
            self._paused_until, self._clock() + min(seconds, MAX_UPSTREAM_PAUSE)
        )

    async def _take(self) -> bool:
        # The turn lock makes test-then-hit atomic within this process.
        for item in self._items:
            if not await self._strategy.test(item, self.name):
                return False
        for item in self._items:
            await self._strategy.hit(item, self.name)
        return True

    async def _next_free(self) -> float:
        free_at = self._clock()
        for item in self._items:
            stats = await self._strategy.get_window_stats(item, self.name)
            if stats.remaining <= 0:
                free_at = max(free_at, stats.reset_time)
        return free_at

    async def _refusal(self, free_at: float | None = None) -> RateLimited:
        now = self._clock()
        if free_at is None:
            free_at = max(self._paused_until, await self._next_free())
        return RateLimited(
            f"{self.name} is over its rate limit and no slot frees up within "
            f"{self._max_wait:g} s (rate_limit_max_wait)",
            retry_after=max(1, math.ceil(free_at - now)),
        )


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

        def build(kind: str, name: str, rates: Sequence[str], wait: float) -> RateLimiter:
            return RateLimiter(
                name=f"{kind} {name!r}", rates=rates, max_wait=wait, strategy=strategy, clock=clock
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

    async def acquire(self, *, credential: str, client: str) -> None:
        client_limiter = self._clients.get(client)
        if client_limiter is not None:
            await client_limiter.acquire()
        credential_limiter = self._credentials.get(credential)
        if credential_limiter is not None:
            await credential_limiter.acquire()

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
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
