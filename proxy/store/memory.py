"""The in-process store: every credential's token state, the rate-limit counters and the
upstream-429 pauses of one process, with the same semantics as the Redis store.

The counters are written here rather than wrapped around the `limits` library's MemoryStorage:
a request holds a pending entry from admission until upstream answers and is then counted at
that later time, entries of every limit of several limiters are taken at once or not at all,
a pending entry stops counting after its hold, the time injected for tests must drive them,
and "when is the next slot free" must be exact for Retry-After. MemoryStorage has none of these
(it reads time.time() itself and counts at the hit). A test compares what these counters
admit with the library's moving window where both apply (tests/store/test_memory.py)."""

from __future__ import annotations

import asyncio
import bisect
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from proxy.refusals import RefusingPaths
from proxy.store.base import (
    Admission,
    Claim,
    CredentialIdentity,
    FetchFailure,
    SharedToken,
    Slot,
    TokenSnapshot,
)

# A failure state outlives its retry_at by this much, so that the count of failures in a row
# (and with it the backoff) survives until the next attempt has been made.
FAILURE_MEMORY = 300.0
ORIGIN = "memory"


class MemoryTokens:
    """One credential's token state in this process (see TokenStore)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._token: SharedToken | None = None
        self._failure: FetchFailure | None = None
        self._owner: str | None = None
        self._lock_until = 0.0
        self.paths = RefusingPaths(clock=clock)
        self._generation = 0
        self._changed = asyncio.Event()

    async def load(self) -> TokenSnapshot:
        return self.snapshot()

    def snapshot(self) -> TokenSnapshot:
        """As load(), without a wait (the fallback store reads it this way)."""
        now = self._clock()
        token = self._token
        if token is not None and token.expires_at <= now:
            token = self._token = None
        failure = self._failure
        if failure is not None and failure.retry_at + FAILURE_MEMORY <= now:
            failure = self._failure = None
        return TokenSnapshot(token=token, failure=failure, generation=self._generation)

    async def publish(
        self, *, value: str, obtained_at: float, expires_at: float, scope: str | None
    ) -> SharedToken:
        token = SharedToken(
            value=value,
            obtained_at=obtained_at,
            expires_at=expires_at,
            scope=scope,
            version=secrets.token_hex(12),
        )
        self.install(token)
        return token

    def install(self, token: SharedToken) -> None:
        """Make `token`, version and all, the current one (what another store published)."""
        if self._token is not None and self._token.version == token.version:
            return
        self._token = token
        self._failure = None
        self._bump()

    def mirror(self, snapshot: TokenSnapshot) -> None:
        """Take on another store's state, token and failure as they are (the fallback store
        keeps what Redis said, for when it goes on alone)."""
        token = snapshot.token
        same_token = (self._token.version if self._token else None) == (
            token.version if token else None
        )
        if same_token and self._failure == snapshot.failure:
            return
        self._token = token
        self._failure = snapshot.failure
        self._bump()

    async def drop(self, version: str) -> bool:
        token = self.snapshot().token
        if token is None or token.version != version:
            return False
        self._token = None
        self._bump()
        return True

    async def record_failure(self, failure: FetchFailure) -> None:
        self.install_failure(failure)

    def install_failure(self, failure: FetchFailure) -> None:
        """As record_failure, without a wait."""
        if self._failure == failure:
            return
        self._failure = failure
        self._bump()

    async def lock(self, ttl: float) -> str | None:
        now = self._clock()
        if self._owner is not None and now < self._lock_until:
            return None
        self._owner = secrets.token_hex(16)
        self._lock_until = now + ttl
        return self._owner

    async def unlock(self, owner: str) -> bool:
        if self._owner is None or not secrets.compare_digest(self._owner, owner):
            return False
        if self._clock() >= self._lock_until:
            self._owner = None
            return False
        self._owner = None
        self._bump()
        return True

    async def wait_changed(self, generation: int) -> None:
        while self._generation <= generation:
            await self._changed.wait()

    async def remember_refusing(self, path: str, seconds: float) -> None:
        self.paths.refuse(path, seconds=seconds)

    async def refuses(self, path: str) -> bool:
        return self.paths.refuses(path)

    def _bump(self) -> None:
        self._generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class _Window:
    """The settled entries of one limiter (their times, oldest first), its pending ones
    (their ids and the times they stop counting) and its queue of waiting requests (their
    tickets in arrival order, and the times they stop waiting)."""

    __slots__ = ("counted", "pending", "queue")

    def __init__(self) -> None:
        self.counted: deque[float] = deque()
        self.pending: dict[str, float] = {}
        self.queue: dict[str, float] = {}

    def expire(self, now: float, longest: float) -> None:
        counted = self.counted
        while counted and counted[0] < now - longest:
            counted.popleft()
        for entry in [entry for entry, until in self.pending.items() if until <= now]:
            del self.pending[entry]
        if self.queue:
            for ticket in [ticket for ticket, until in self.queue.items() if until <= now]:
                del self.queue[ticket]

    def ahead(self, ticket: str | None) -> int:
        """The live tickets queued before `ticket` (all of them for a request without one)."""
        if ticket is None or ticket not in self.queue:
            return len(self.queue)
        return list(self.queue).index(ticket)

    def free_at(self, claim: Claim, now: float, ahead: int = 0) -> float:
        """When this limiter has room for one more after `ahead` others (now if it has): an
        entry counts while its time is at least now - window, as in the `limits` library's
        moving window."""
        free_at = now
        counted = self.counted
        pending = len(self.pending) + ahead
        for rate in claim.rates:
            if len(counted) + pending < rate.amount:
                continue  # room even if every entry kept were in this window
            start = bisect.bisect_left(counted, now - rate.seconds)
            in_window = len(counted) - start
            over = in_window + pending + 1 - rate.amount
            if over <= 0:
                continue
            if over <= in_window:
                leaves = counted[start + over - 1] + rate.seconds
                free_at = max(free_at, _after(leaves))
            else:
                # Pending entries (and those queued ahead) fill it: they are counted when they
                # settle, at now at the earliest, and leave one window after that; each window
                # after that frees `amount` places at most.
                windows = math.ceil((over - in_window) / rate.amount)
                free_at = max(free_at, now + rate.seconds * windows)
        return free_at


def _after(moment: float) -> float:
    """Just after `moment` (a microsecond, as Redis counts): when an entry that reaches the
    edge of its window at `moment` has left it."""
    return moment + 1e-6


class MemoryCounters:
    """Rate-limit counters and 429 pauses in this process (see LimitStore, PauseStore)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._paused: dict[str, float] = {}

    def _window(self, claim: Claim, now: float) -> _Window:
        window = self._windows.get(claim.key)
        if window is None:
            window = self._windows[claim.key] = _Window()
        window.expire(now, claim.longest)
        return window

    def _free_at(self, claims: Sequence[Claim], now: float, ticket: str | None = None) -> float:
        free_at = now
        for claim in claims:
            window = self._window(claim, now)
            free_at = max(free_at, self._paused.get(claim.key, 0.0))
            free_at = max(free_at, window.free_at(claim, now, window.ahead(ticket)))
        return free_at

    async def acquire(
        self,
        claims: Sequence[Claim],
        *,
        hold: float,
        queue: float = 0.0,
        ticket: str | None = None,
    ) -> Admission:
        now = self._clock()
        free_at = self._free_at(claims, now, ticket)
        if free_at > now:
            if ticket is None and queue > 0:
                ticket = secrets.token_hex(8)
            if ticket is not None:
                for claim in claims:
                    # A ticket that ran out queues again, at the back.
                    self._windows[claim.key].queue.setdefault(ticket, now + queue)
            return Admission(slot=None, wait=free_at - now, ticket=ticket)
        entry = ticket if ticket is not None else secrets.token_hex(8)
        for claim in claims:
            window = self._windows[claim.key]
            window.queue.pop(entry, None)
            window.pending[entry] = now + hold
        return Admission(slot=Slot(id=entry, claims=tuple(claims), origin=ORIGIN), wait=0.0)

    async def leave(self, claims: Sequence[Claim], ticket: str) -> None:
        for claim in claims:
            window = self._windows.get(claim.key)
            if window is not None:
                window.queue.pop(ticket, None)

    async def settle(self, slot: Slot) -> None:
        now = self._clock()
        for claim in slot.claims:
            window = self._window(claim, now)
            window.pending.pop(slot.id, None)
            # Clocks may step back; entries stay in order so that bisect holds.
            at = max(now, window.counted[-1]) if window.counted else now
            window.counted.append(at)

    async def release(self, slot: Slot) -> None:
        for claim in slot.claims:
            window = self._windows.get(claim.key)
            if window is not None:
                window.pending.pop(slot.id, None)

    async def next_free(self, claims: Sequence[Claim]) -> float:
        now = self._clock()
        return self._free_at(claims, now) - now

    async def pause(self, key: str, seconds: float) -> float:
        return self.install_pause(key, seconds)

    def install_pause(self, key: str, seconds: float) -> float:
        """As pause(), without a wait (the fallback store mirrors shared pauses this way)."""
        now = self._clock()
        until = max(now + seconds, self._paused.get(key, 0.0))
        self._paused[key] = until
        return until - now

    async def pause_left(self, key: str) -> float:
        return self.pause_seen(key)

    def pause_seen(self, key: str) -> float:
        until = self._paused.get(key)
        return 0.0 if until is None else max(0.0, until - self._clock())

    def watch(self, key: str) -> None:
        """Every pause of this store is its own: nothing to watch."""

    def counted(self, key: str) -> list[float]:
        """The times at which the settled entries of `key` were counted (for tests)."""
        window = self._windows.get(key)
        return list(window.counted) if window is not None else []


class MemoryStore:
    """Shared state within this process only (the default, and the fallback's own)."""

    backend = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[str, MemoryTokens] = {}
        self._counters = MemoryCounters(clock=clock)

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def close(self) -> None:
        """Nothing to close."""

    def tokens(self, identity: CredentialIdentity, secret: str) -> MemoryTokens:
        tokens = self._tokens.get(identity.digest)
        if tokens is None:
            tokens = self._tokens[identity.digest] = MemoryTokens(clock=self._clock)
        return tokens

    @property
    def counters(self) -> MemoryCounters:
        return self._counters

    def responses(self, identity: CredentialIdentity, secret: str) -> None:
        # The cache keeps its entries in this process's memory itself.
        return None

    def state(self) -> dict[str, Any]:
        return {"backend": self.backend}
