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
replica that died mid-request stop counting. Two round trips per request: acquire, settle.

Keys per limiter key K: `{prefix}{rl:K}:hits` (counted, scored by time in microseconds),
`:pending` (scored by deadline), `:pause` (PX = the pause's length)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from proxy.store.base import Admission, Claim, Slot
from proxy.store.redis_calls import bounded
from proxy.store.redis_events import Events

ORIGIN = "redis"
_MICRO = 1_000_000

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local free_at = now
local arg = 5
for c = 0, tonumber(ARGV[4]) - 1 do
  local hits, pending, pause = KEYS[3 * c + 1], KEYS[3 * c + 2], KEYS[3 * c + 3]
  local paused = redis.call('PTTL', pause)
  if paused > 0 then free_at = math.max(free_at, now + paused * 1000) end
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  local in_flight = redis.call('ZCARD', pending)
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
        -- Pending entries fill it: counted when they settle, at now at the earliest.
        free_at = math.max(free_at, now + window)
      end
    end
  end
  if longest > 0 then redis.call('ZREMRANGEBYSCORE', hits, '-inf', now - longest - 1) end
end
if free_at > now or ARGV[1] ~= 'take' then return {0, free_at - now} end
local hold = tonumber(ARGV[3])
local ttl = math.floor(hold / 1000) + 1000
for c = 0, tonumber(ARGV[4]) - 1 do
  local pending = KEYS[3 * c + 2]
  redis.call('ZADD', pending, now + hold, ARGV[2])
  if redis.call('PTTL', pending) < ttl then redis.call('PEXPIRE', pending, ttl) end
end
return {1, 0}
"""
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for c = 0, #KEYS / 2 - 1 do
  local hits = KEYS[2 * c + 1]
  redis.call('ZREM', KEYS[2 * c + 2], ARGV[1])
  redis.call('ZADD', hits, now, ARGV[1])
  redis.call('PEXPIRE', hits, math.floor(tonumber(ARGV[c + 2]) / 1000) + 1000)
end
return now
"""
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


class RedisCounters:
    """Rate-limit counters and 429 pauses in Redis (see LimitStore, PauseStore)."""

    def __init__(
        self, *, client: aioredis.Redis, events: Events, prefix: str, timeout: float
    ) -> None:
        self._client = client
        self._events = events
        self._prefix = prefix
        self._timeout = timeout
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._release = client.register_script(_RELEASE)
        self._pause = client.register_script(_PAUSE)

    def key(self, limiter: str, part: str) -> str:
        """The Redis key of one part (hits, pending, pause) of a limiter."""
        return f"{self._prefix}{{rl:{limiter}}}:{part}"

    async def _run(
        self, mode: str, entry: str, claims: Sequence[Claim], hold: float
    ) -> tuple[bool, float]:
        keys: list[str] = []
        args: list[str | int] = [mode, entry, max(1, int(hold * _MICRO)), len(claims)]
        for claim in claims:
            keys += [self.key(claim.key, part) for part in ("hits", "pending", "pause")]
            args.append(len(claim.rates))
            for rate in claim.rates:
                args += [rate.amount, max(1, int(rate.seconds * _MICRO))]
        granted, wait = await bounded(self._acquire(keys=keys, args=args), self._timeout)
        return bool(granted), int(wait) / _MICRO

    async def acquire(self, claims: Sequence[Claim], *, hold: float) -> Admission:
        entry = secrets.token_hex(8)
        granted, wait = await self._run("take", entry, claims, hold)
        if not granted:
            return Admission(slot=None, wait=wait)
        return Admission(slot=Slot(id=entry, claims=tuple(claims), origin=ORIGIN), wait=0.0)

    async def settle(self, slot: Slot) -> None:
        keys: list[str] = []
        args: list[str | int] = [slot.id]
        for claim in slot.claims:
            keys += [self.key(claim.key, "hits"), self.key(claim.key, "pending")]
            args.append(max(1, int(claim.longest * _MICRO)))
        await bounded(self._settle(keys=keys, args=args), self._timeout)

    async def release(self, slot: Slot) -> None:
        keys = [self.key(claim.key, "pending") for claim in slot.claims]
        await bounded(self._release(keys=keys, args=[slot.id]), self._timeout)

    async def next_free(self, claims: Sequence[Claim]) -> float:
        _, wait = await self._run("peek", "", claims, 0.0)
        return wait

    async def pause(self, key: str, seconds: float) -> float:
        milliseconds = max(1, int(seconds * 1000))
        left = await bounded(
            self._pause(
                keys=[self.key(key, "pause")],
                args=[milliseconds, self._events.channel, key],
            ),
            self._timeout,
        )
        self._remember(key, int(left))
        return int(left) / 1000

    def _remember(self, key: str, milliseconds: int) -> None:
        events = self._events
        until = time.monotonic() + max(0, milliseconds) / 1000
        events.pauses[key] = max(until, events.pauses.get(key, 0.0))
        events.known.add(key)

    async def pause_left(self, key: str) -> float:
        events = self._events
        if not (events.subscribed.is_set() and key in events.known):
            # First sight of this key since (re)subscribing: read it once; the subscription
            # keeps it current from then on.
            left = await bounded(self._client.pttl(self.key(key, "pause")), self._timeout)
            self._remember(key, int(left))
        return max(0.0, events.pauses.get(key, 0.0) - time.monotonic())
