"""ConnectionSlots: how many upstream connections a transport may have in use at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from proxy.errors import UpstreamBusy, UpstreamError


class ConnectionSlots:
    """A count of upstream connections that may be in use, and the exchanges waiting for one
    in arrival order; an exchange that waits longer than `wait` seconds gets UpstreamBusy.

    A route's own slots have the pool's as their `parent`: taking one takes one of each, so
    that a route keeps within its own cap and the whole pool within its own."""

    __slots__ = ("_busy", "_free", "_parent", "_wait", "_waiters", "limit")

    def __init__(
        self, limit: int, *, wait: float, busy: str, parent: ConnectionSlots | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"a connection limit of {limit} admits no request")
        self.limit = limit
        self._free = limit
        self._wait = wait
        self._busy = busy
        self._parent = parent
        self._waiters: deque[asyncio.Future[None]] = deque()

    @classmethod
    def for_pool(cls, max_connections: int, *, wait: float) -> ConnectionSlots:
        """The pool's slots: the global `max_connections`, shared by every route."""
        return cls(
            max_connections,
            wait=wait,
            busy=f"all upstream connections stayed busy for connect_timeout ({wait:g} s); "
            "raise max_connections",
        )

    @classmethod
    def for_route(
        cls, prefix: str, max_connections: int, *, wait: float, parent: ConnectionSlots
    ) -> ConnectionSlots:
        """A route's own slots: its `max_connections`, within the pool's."""
        return cls(
            max_connections,
            wait=wait,
            busy=f"all {max_connections} upstream connections of route {prefix!r} stayed busy "
            f"for {wait:g} s; raise max_connections of that route if upstream can take more",
            parent=parent,
        )

    @property
    def free(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_take(self) -> bool:
        """Take a slot (and the parent's) if one is free now, without waiting."""
        parent = self._parent
        if self._free > 0 and (parent is None or parent._free > 0):
            self._free -= 1
            if parent is not None:
                parent._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot (and the parent's), waiting up to `wait` seconds for each."""
        if self._free > 0:
            self._free -= 1
        else:
            await self._wait_for_one()
        if self._parent is not None:
            try:
                await self._parent.take()
            except BaseException:
                self._give_own()
                raise

    def give(self) -> None:
        """A slot taken by try_take or take is free again."""
        self._give_own()
        if self._parent is not None:
            self._parent.give()

    def close(self) -> None:
        """Fail every exchange still waiting, at once rather than after `wait`."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("the upstream client is closing"))

    async def _wait_for_one(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._wait):
                await waiter
        except BaseException as exc:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):  # never left behind in the queue
                    self._waiters.remove(waiter)
            elif waiter.exception() is None:
                self._give_own()  # handed over just as the wait ended: pass it on
            if isinstance(exc, TimeoutError):
                raise UpstreamBusy(self._busy) from exc
            raise

    def _give_own(self) -> None:
        """To the longest waiting exchange, else back to the count."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
