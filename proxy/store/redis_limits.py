"""Rate-limit counters and upstream-429 pauses in Redis, shared by every replica: small Lua
scripts over one sorted set of counted entries and one of pending entries per limiter.

Why not the `limits` library's async Redis storage (its moving window), tried first: it has no
reservation step, so "hold a slot while the request is in flight, count it when upstream
answers" (which keeps every sliding window of upstream arrivals at the limit) cannot be said,
and a sliding one-second window saw 21-26 requests under 20/second; it cannot take an entry in
two limits (100/second and 36000/hour) atomically; and its timestamps come from each replica's
clock. Here one script, stamped with Redis's own clock (TIME), checks every limit of every
claim and the claims' pauses, and adds a pending entry to all of them or to none; settling
stamps the entry again at the answer; a pending entry carries a deadline, so the entries of a
replica that died mid-request stop counting. Two round trips per request at most: acquire,
settle (those of one limiter in one turn of the event loop share a call), each an EVALSHA on
redis_calls.lean_client's connections, and an EVAL of the whole script only when Redis does
not know it.

Requests that wait are served first come first served across replicas, not just within each:
one refused with time to wait gets a ticket in the limiter's queue, stamped with Redis's clock,
and a slot goes to a request only when there is room for it and every live ticket before it.
A ticket runs out with its holder's max wait, so a replica that died holds no place for long.

Keys per limiter key K: `{prefix}{rl:K}:hits` (counted, scored by time in microseconds),
`:pending` (scored by deadline), `:pause` (PX = the pause's length), `:queue` (tickets scored
by arrival) and `:leaves` (the same tickets scored by when they stop waiting)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from proxy.store.base import Admission, Claim, Slot
from proxy.store.redis_calls import Connections, Deadlines, bounded
from proxy.store.redis_events import Events

ORIGIN = "redis"
_MICRO = 1_000_000
_PARTS = ("hits", "pending", "pause", "queue", "leaves")

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local free_at = now
local entry, hold, claims, wait = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local has_ticket = ARGV[6] == '1'
local queued_everywhere = true
local arg = 7
for c = 0, claims - 1 do
  local hits, pending, pause = KEYS[5 * c + 1], KEYS[5 * c + 2], KEYS[5 * c + 3]
  local queue, leaves = KEYS[5 * c + 4], KEYS[5 * c + 5]
  local paused = redis.call('PTTL', pause)
  if paused > 0 then free_at = math.max(free_at, now + paused * 1000) end
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', leaves, '-inf', now)) do
    redis.call('ZREM', leaves, gone)
    redis.call('ZREM', queue, gone)
  end
  -- Those queued before this request are served first: it needs room for them too.
  local ahead = false
  if has_ticket then ahead = redis.call('ZRANK', queue, entry) end
  if not ahead then
    ahead = redis.call('ZCARD', queue)
    queued_everywhere = false
  end
  local in_flight = redis.call('ZCARD', pending) + ahead
  local longest = 0
  local rates = tonumber(ARGV[arg])
  arg = arg + 1
  for r = 1, rates do
    local amount, window = tonumber(ARGV[arg]), tonumber(ARGV[arg + 1])
    arg = arg + 2
    if window > longest then longest = window end
    -- An entry counts while its time is at least now - window (as in `limits`).
    local counted = redis.call('ZCOUNT', hits, now - window, '+inf')
    local over = counted + in_flight + 1 - amount
    if over > 0 then
      if over <= counted then
        local leaving = redis.call('ZRANGEBYSCORE', hits, now - window, '+inf',
                                   'WITHSCORES', 'LIMIT', over - 1, 1)
        free_at = math.max(free_at, tonumber(leaving[2]) + window + 1)
      else
        -- Pending entries (and tickets ahead) fill it: counted when they settle, at now at the
        -- earliest; each window after that frees `amount` places at most.
        free_at = math.max(free_at, now + window * math.ceil((over - counted) / amount))
      end
    end
  end
  if longest > 0 then redis.call('ZREMRANGEBYSCORE', hits, '-inf', now - longest - 1) end
end
if ARGV[1] ~= 'take' then return {0, free_at - now, 0} end
if free_at > now then
  if queued_everywhere then return {0, free_at - now, 1} end
  if wait <= 0 then return {0, free_at - now, 0} end
  -- Into the queue, at the back, or where the ticket still is.
  local ttl = math.floor(wait / 1000) + 1000
  for c = 0, claims - 1 do
    local queue, leaves = KEYS[5 * c + 4], KEYS[5 * c + 5]
    if redis.call('ZADD', queue, 'NX', now, entry) == 1 then
      redis.call('ZADD', leaves, now + wait, entry)
    end
    for _, key in ipairs({queue, leaves}) do
      if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    end
  end
  return {0, free_at - now, 1}
end
local ttl = math.floor(hold / 1000) + 1000
for c = 0, claims - 1 do
  local pending = KEYS[5 * c + 2]
  redis.call('ZREM', KEYS[5 * c + 4], entry)
  redis.call('ZREM', KEYS[5 * c + 5], entry)
  redis.call('ZADD', pending, now + hold, entry)
  if redis.call('PTTL', pending) < ttl then redis.call('PEXPIRE', pending, ttl) end
end
return {1, 0, 0}
"""
# Settles every entry named from ARGV[3 + claims] on, all answered ARGV[1] microseconds ago (0
# but for slots settled late, after Redis was away); ARGV[3 ..]: each claim's longest window.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local at = now - tonumber(ARGV[1])
local claims = tonumber(ARGV[2])
for c = 0, claims - 1 do
  local hits, pending = KEYS[2 * c + 1], KEYS[2 * c + 2]
  for e = claims + 3, #ARGV do
    redis.call('ZREM', pending, ARGV[e])
    redis.call('ZADD', hits, at, ARGV[e])
  end
  redis.call('PEXPIRE', hits, math.floor(tonumber(ARGV[c + 3]) / 1000) + 1000)
end
return at
"""
# Also how a request leaves the queue: its ticket out of `:queue` and `:leaves`.
_RELEASE = """
for c = 1, #KEYS do redis.call('ZREM', KEYS[c], ARGV[1]) end
return 1
"""
_PAUSE = """
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  redis.call('PUBLISH', ARGV[2], 'p ' .. ARGV[1] .. ' ' .. ARGV[3])
  return want
end
return left
"""


class Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole when Redis does not know it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class _Plan:
    """What the scripts are sent for one tuple of claims, but for the per-call arguments:
    built once per limiter rather than on every request."""

    __slots__ = ("acquire_keys", "claims", "rates", "release_keys", "settle_keys", "windows")

    def __init__(self, counters: RedisCounters, claims: Sequence[Claim]) -> None:
        self.claims = claims
        self.acquire_keys = [counters.key(claim.key, part) for claim in claims for part in _PARTS]
        self.rates: list[int] = []
        for claim in claims:
            self.rates.append(len(claim.rates))
            for rate in claim.rates:
                self.rates += [rate.amount, max(1, int(rate.seconds * _MICRO))]
        self.settle_keys = [
            counters.key(claim.key, part) for claim in claims for part in ("hits", "pending")
        ]
        self.windows = [max(1, int(claim.longest * _MICRO)) for claim in claims]
        self.release_keys = [counters.key(claim.key, "pending") for claim in claims]


# Plans kept for this many tuples of claims at most (a process has one per limiter).
_PLANS_KEPT = 256
# Settles of one limiter sent in one script call at most.
SETTLES_PER_CALL = 200


class _Settles:
    """The settles of one limiter asked for in one turn of the event loop: one script call."""

    __slots__ = ("ids", "waiters")

    def __init__(self) -> None:
        self.ids: list[str] = []
        # One future each, rather than one for all: a settler that stops waiting cancels its own.
        self.waiters: list[asyncio.Future[None]] = []


class RedisCounters:
    """Rate-limit counters and 429 pauses in Redis (see LimitStore, PauseStore). `client`:
    redis_calls.lean_client, since two of these scripts are on every request's path."""

    def __init__(
        self, *, client: aioredis.Redis, events: Events, prefix: str, timeout: float
    ) -> None:
        self._client = client
        self._connections = Connections(client)
        self._deadlines = Deadlines(timeout)
        self._events = events
        self._prefix = prefix
        self._timeout = timeout
        self._plans: dict[int, _Plan] = {}
        self._settles: dict[_Plan, _Settles] = {}
        self._sending: set[asyncio.Task[None]] = set()
        # Entry ids: unique across replicas by the random part, and cheaper than a token_hex
        # (a getrandom call) per request.
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self._acquire = Script(_ACQUIRE)
        self._settle = Script(_SETTLE)
        self._release = Script(_RELEASE)
        self._pause = Script(_PAUSE)

    async def _script(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run `script`, within one redis_timeout (StoreUnavailable otherwise)."""
        return await self._deadlines.run(self._evalsha(script, keys, args))

    async def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        # On a connection of the store's own list (redis_calls.Connections), without the rest
        # of what Redis.execute_command does per command (retries, which are off, and
        # instrumentation). A call cut short disconnects its connection (redis-py does that on
        # any interruption of a read or a write), so none is taken again with a reply left in
        # it.
        connections = self._connections
        connection = await connections.take()
        try:
            # No health check: the client has none configured (its PING would be a round trip).
            command = connection.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)
            await connection.send_packed_command(command, check_health=False)
            try:
                return await connection.read_response()
            except NoScriptError:
                # A Redis restarted, failed over or flushed: the whole text, which it keeps.
                command = connection.pack_command("EVAL", script.text, len(keys), *keys, *args)
                await connection.send_packed_command(command, check_health=False)
                return await connection.read_response()
        finally:
            connections.give(connection)

    def key(self, limiter: str, part: str) -> str:
        """The Redis key of one part (hits, pending, pause) of a limiter."""
        return f"{self._prefix}{{rl:{limiter}}}:{part}"

    def new_entry(self) -> str:
        """An id for a new pending entry or ticket, unique across every replica."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def _plan(self, claims: Sequence[Claim]) -> _Plan:
        # By identity: a limiter passes the same tuple on every call, and its slots keep it.
        plan = self._plans.get(id(claims))
        if plan is not None and plan.claims is claims:
            return plan
        plan = _Plan(self, claims)
        if isinstance(claims, tuple):  # a list may change, or its id be another's later
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[id(claims)] = plan
        return plan

    async def _run(
        self,
        mode: str,
        claims: Sequence[Claim],
        *,
        entry: str = "",
        hold: float = 0.0,
        queue: float = 0.0,
        ticket: bool = False,
    ) -> tuple[bool, float, bool]:
        plan = self._plan(claims)
        args: list[str | int] = [
            mode,
            entry,
            max(1, int(hold * _MICRO)),
            len(claims),
            max(0, int(queue * _MICRO)),
            "1" if ticket else "0",
            *plan.rates,
        ]
        granted, wait, queued = await self._script(self._acquire, plan.acquire_keys, args)
        return bool(granted), int(wait) / _MICRO, bool(queued)

    async def acquire(
        self,
        claims: Sequence[Claim],
        *,
        hold: float,
        queue: float = 0.0,
        ticket: str | None = None,
    ) -> Admission:
        entry = ticket if ticket is not None else self.new_entry()
        granted, wait, queued = await self._run(
            "take", claims, entry=entry, hold=hold, queue=queue, ticket=ticket is not None
        )
        if not granted:
            return Admission(slot=None, wait=wait, ticket=entry if queued else None)
        return Admission(slot=Slot(id=entry, claims=tuple(claims), origin=ORIGIN), wait=0.0)

    async def leave(self, claims: Sequence[Claim], ticket: str) -> None:
        keys = [self.key(claim.key, part) for claim in claims for part in ("queue", "leaves")]
        await self._script(self._release, keys, [ticket])

    async def settle(self, slot: Slot, *, ago: float = 0.0) -> None:
        """See LimitStore.settle; `ago`: upstream answered that many seconds before (a slot
        whose settle could not reach Redis then is counted at the time it should have been).

        The settles of one limiter asked for in the same turn of the event loop (upstream
        answered them together) go in one script call, made once that turn is over: under
        load, a fraction of a call per request instead of one, each counted at the same time
        it would have been. A settler that stops waiting does not stop its settle."""
        plan = self._plan(slot.claims)
        if ago > 0:
            await self._settle_now(plan, [slot.id], ago)
            return
        settles = self._settles.get(plan)
        if settles is None or len(settles.ids) >= SETTLES_PER_CALL:
            settles = self._settles[plan] = _Settles()
            task = asyncio.get_running_loop().create_task(self._settle_soon(plan, settles))
            self._sending.add(task)  # a task the loop holds only weakly
            task.add_done_callback(self._sending.discard)
        waiter = asyncio.get_running_loop().create_future()
        settles.ids.append(slot.id)
        settles.waiters.append(waiter)
        await waiter

    async def _settle_soon(self, plan: _Plan, settles: _Settles) -> None:
        # A task's first step runs once the callbacks ready now have run: every settle asked
        # for in this turn has joined by then.
        if self._settles.get(plan) is settles:
            del self._settles[plan]
        try:
            await self._settle_now(plan, settles.ids, 0.0)
        except Exception as exc:
            for waiter in settles.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except BaseException:
            for waiter in settles.waiters:
                waiter.cancel()
            raise
        for waiter in settles.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _settle_now(self, plan: _Plan, ids: Sequence[str], ago: float) -> None:
        args: list[str | int] = [max(0, int(ago * _MICRO)), len(plan.claims), *plan.windows, *ids]
        await self._script(self._settle, plan.settle_keys, args)

    async def release(self, slot: Slot) -> None:
        await self._script(self._release, self._plan(slot.claims).release_keys, [slot.id])

    async def next_free(self, claims: Sequence[Claim]) -> float:
        _, wait, _ = await self._run("peek", claims)
        return wait

    async def pause(self, key: str, seconds: float) -> float:
        milliseconds = max(1, int(seconds * 1000))
        left = await self._script(
            self._pause, [self.key(key, "pause")], [milliseconds, self._events.channel, key]
        )
        self._remember(key, int(left))
        return int(left) / 1000

    def _remember(self, key: str, milliseconds: int) -> None:
        events = self._events
        until = time.monotonic() + max(0, milliseconds) / 1000
        events.pauses[key] = max(until, events.pauses.get(key, 0.0))
        events.known.add(key)

    def pause_seen(self, key: str) -> float:
        return max(0.0, self._events.pauses.get(key, 0.0) - time.monotonic())

    def watch(self, key: str) -> None:
        self._events.watch(key, self.key(key, "pause"))

    async def pause_left(self, key: str) -> float:
        events = self._events
        if not (events.subscribed.is_set() and key in events.known):
            # First sight of this key since (re)subscribing: read it once; the subscription
            # keeps it current from then on.
            left = await bounded(self._client.pttl(self.key(key, "pause")), self._timeout)
            self._remember(key, int(left))
        return max(0.0, events.pauses.get(key, 0.0) - time.monotonic())
