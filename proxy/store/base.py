"""The interfaces of shared state (a credential's token, rate-limit counters, the upstream-429
pause) and the values that cross them; times are wall-clock epoch seconds throughout."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.refusals import RefusingPaths

SHARED = "shared"
ALONE = "alone"

# The defaults of redis_key_prefix and redis_timeout, here so that the settings need not
# import redis-py to know them.
DEFAULT_REDIS_PREFIX = "token-proxy:"
# Every Redis call gives up after this long. A healthy Redis answers in well under a
# millisecond on a LAN and a few across zones or over TLS, so 250 ms only ever cuts off a Redis
# that is gone or stalled; it is also the most any request waits on Redis before the fallback
# store goes on alone, well below client timeouts and the one-second windows of rate limits.
DEFAULT_REDIS_TIMEOUT = 0.25


@dataclass(frozen=True, slots=True)
class CredentialIdentity:
    """What makes two configured credentials the same one, whatever they are named."""

    token_url: str
    client_id: str
    scope: str = ""
    extra_params: tuple[tuple[str, str], ...] = ()
    auth_method: str = "client_secret_basic"

    @classmethod
    def of(
        cls,
        *,
        token_url: str,
        client_id: str,
        scope: str = "",
        extra_params: Mapping[str, str] | None = None,
        auth_method: str = "client_secret_basic",
    ) -> CredentialIdentity:
        # A scope is a set of space-separated names (RFC 6749 3.3): order and repeats do not
        # make another credential.
        return cls(
            token_url=token_url,
            client_id=client_id,
            scope=" ".join(sorted(set(scope.split()))),
            extra_params=tuple(sorted((extra_params or {}).items())),
            auth_method=auth_method,
        )

    @property
    def digest(self) -> str:
        """A stable name for this credential that reveals none of its fields (128 bits)."""
        canonical = json.dumps(
            [
                "token-proxy credential v1",
                self.token_url,
                self.client_id,
                self.scope,
                [list(pair) for pair in self.extra_params],
                self.auth_method,
            ],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class SharedToken:
    """An access token as stored for every replica; `version` names this one publication."""

    value: str = field(repr=False)
    obtained_at: float
    expires_at: float
    scope: str | None = None
    version: str = ""


@dataclass(frozen=True, slots=True)
class FetchFailure:
    """The shared state after failed token requests: how many in a row, the OAuth error (and
    its description), whether the endpoint refused the credential, when to try again."""

    failures: int
    error: str
    retry_at: float
    rejected: bool = False
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class TokenSnapshot:
    """One read of a credential's shared state. `generation` grows with every change; pass
    it to `wait_changed` to wait for the next one."""

    token: SharedToken | None
    failure: FetchFailure | None
    generation: int


class TokenStore(Protocol):
    """One credential's token, its single-flight fetch lock, its failure state, and the
    memory of paths that refuse every application token (SPEC §3(b))."""

    paths: RefusingPaths
    """This process's copy of the 401 rule's memory of paths (wall-clock times), which requests
    read and write without a wait. A store in this process holds it as its own; the workers'
    relay keeps every worker's in step; a shared store adds remember_refusing/refuses."""

    async def load(self) -> TokenSnapshot:
        """The current token (None once expired or dropped) and failure state."""
        ...

    async def publish(
        self, *, value: str, obtained_at: float, expires_at: float, scope: str | None
    ) -> SharedToken:
        """Make this the current token (it expires with `expires_at`), clear the failure
        state, and wake every waiter. Returns the token with its new version."""
        ...

    async def drop(self, version: str) -> bool:
        """Drop the current token if it is still `version` (upstream rejected it): True for
        the one caller that dropped it, False if it was already replaced or dropped."""
        ...

    async def record_failure(self, failure: FetchFailure) -> None:
        """Share the state after a failed token request (kept until a while past its
        retry_at), and wake every waiter."""
        ...

    async def lock(self, ttl: float) -> str | None:
        """Take the fetch lock: an owner token, or None if another holds it. The lock frees
        itself after `ttl` seconds if its holder never releases it."""
        ...

    async def unlock(self, owner: str) -> bool:
        """Release the fetch lock if `owner` still holds it, and wake every waiter."""
        ...

    async def wait_changed(self, generation: int) -> None:
        """Return once the state may be newer than `generation` (read it again then); bound
        the wait with asyncio.timeout. A lock that expires wakes nobody: wait in slices."""
        ...

    async def remember_refusing(self, path: str, seconds: float) -> None:
        """Remember for `seconds` that `path` refused a freshly fetched token too."""
        ...

    async def refuses(self, path: str) -> bool:
        """Whether `path` is remembered as refusing every application token."""
        ...


@dataclass(frozen=True, slots=True)
class Rate:
    """One limit: at most `amount` requests in any window of `seconds`."""

    amount: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """From the `limits` library's notation, e.g. "100/second" or "36000/hour"."""
        import limits  # noqa: PLC0415  (only with a rate limit set: 2 MiB, 80 ms at start-up)

        item = limits.parse(text)
        return cls(amount=item.amount, seconds=float(item.get_expiry()))


@dataclass(frozen=True, slots=True)
class Claim:
    """A limiter's limits, all of which a request must fit (e.g. 100/second and 36000/hour).
    `key` names the limiter (a credential's digest, a client's name) and its pause."""

    key: str
    rates: tuple[Rate, ...]

    @property
    def longest(self) -> float:
        return max((rate.seconds for rate in self.rates), default=0.0)


@dataclass(frozen=True, slots=True)
class Slot:
    """A pending entry in every limit of some claims: settle it once upstream has answered
    (it is then counted at that time), or release it if the request never went upstream."""

    id: str
    claims: tuple[Claim, ...]
    origin: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What an acquire got: a slot, or none and the seconds until one may be free. Waits are
    relative, so that replicas whose clocks differ from the store's wait the same. `ticket`:
    the place in the queue a request got that may wait (pass it to its next acquire)."""

    slot: Slot | None
    wait: float
    ticket: str | None = None


class LimitStore(Protocol):
    """Rate-limit counters that hold every window at its limit, counting a request at the time
    upstream answered it, and the queue of requests waiting for a slot, first come first
    served across every process that shares the store. acquire never over-admits."""

    async def acquire(
        self,
        claims: Sequence[Claim],
        *,
        hold: float,
        queue: float = 0.0,
        ticket: str | None = None,
    ) -> Admission:
        """A pending slot in every limit of every claim at once, or none. A slot not settled
        or released within `hold` seconds (its replica died) stops counting. A claim whose key
        is paused (see PauseStore) gets no slot before the pause ends.

        Requests queued before this one are served first: a slot goes to a request only when
        there is room for it and for every live ticket ahead of it; `wait` counts them too.
        Refused with `queue` > 0 and no `ticket`, a request takes its place at the back of the
        queue for that many seconds (the Admission's ticket); with its ticket it keeps its
        place. A ticket the store no longer knows (it ran out) queues again at the back."""
        ...

    async def leave(self, claims: Sequence[Claim], ticket: str) -> None:
        """Give up a place in the queue (the request stopped waiting)."""
        ...

    async def settle(self, slot: Slot) -> None:
        """Count the slot's request now (upstream has answered) and end its pending entry."""
        ...

    async def release(self, slot: Slot) -> None:
        """End the slot's pending entry without counting it (nothing went upstream)."""
        ...

    async def next_free(self, claims: Sequence[Claim]) -> float:
        """Seconds until an acquire of `claims` could succeed (0.0 when it could now)."""
        ...


class PauseStore(Protocol):
    """The pause after an upstream 429: nobody sends for that limiter key until it ends."""

    async def pause(self, key: str, seconds: float) -> float:
        """Pause `key` for `seconds` from now unless it is paused for longer already; returns
        the seconds the pause has left."""
        ...

    async def pause_left(self, key: str) -> float:
        """Seconds left of the pause of `key` (0.0 when none); cheap enough to ask on every
        request: implementations answer from a local copy."""
        ...

    def pause_seen(self, key: str) -> float:
        """Seconds left of the pause of `key` as this process knows it now, without a wait:
        its own pauses and those other replicas announced (a shared store keeps that copy
        current in the background). 0.0 when none is known."""
        ...

    def watch(self, key: str) -> None:
        """Keep `key`'s pause in the local copy that pause_seen reads, including a pause set
        before this process started or while it was not listening."""
        ...


class Counters(LimitStore, PauseStore, Protocol):
    """The limits and the pauses of one store, which share their keys."""


class ResponseStore(Protocol):
    """One credential's response-cache entries shared by the replicas: values by the name of
    their primary key (method and URL) and of their variant; each expires after its TTL."""

    async def variants(self, primary: bytes) -> list[bytes]:
        """Every stored variant of `primary` (none when the store cannot answer)."""
        ...

    async def put(self, primary: bytes, variant: bytes, value: bytes, *, ttl: float) -> None:
        """Store one variant for `ttl` seconds, in place of the one of that name."""
        ...

    async def forget(self, primary: bytes, variant: bytes | None = None) -> None:
        """Drop one variant, or every variant of `primary`."""
        ...


class Store(Protocol):
    """Where shared state lives: in this process, or in Redis behind a fallback."""

    backend: str

    async def start(self) -> None:
        """Start what runs in the background; with a shared store, learn whether it answers."""
        ...

    async def close(self) -> None:
        """Stop the background work and close connections."""
        ...

    def tokens(self, identity: CredentialIdentity, secret: str) -> TokenStore:
        """The token store of one credential (the same object for the same identity)."""
        ...

    @property
    def counters(self) -> Counters: ...

    def responses(self, identity: CredentialIdentity, secret: str) -> ResponseStore | None:
        """The shared response-cache entries of one credential; None when the store is this
        process's own (the cache keeps its entries in memory itself)."""
        ...

    def state(self) -> dict[str, Any]:
        """What /-/ready shows of the store: never a URL, a password or a stored value."""
        ...
