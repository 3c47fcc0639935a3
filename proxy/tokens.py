"""An access token as requests hold it and the times that govern it (its refresh, the retry
after a failed request), the TokenSource interface the forwarder gets tokens through, and what
/-/ready and the 503 problems say of a source's status."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.config import Credential
from proxy.errors import ClientRejected, TokenUnavailable
from proxy.oauth import oauth_error
from proxy.store import FetchFailure, SharedToken, TokenStore

REFRESH_FRACTION = 0.8
SAFETY_MARGIN_CAP = 30.0
SAFETY_MARGIN_FRACTION = 0.1
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


def backoff_delay(attempt: int, *, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    doublings = min(max(0, attempt - 1), 32)  # 2**32 s is far past the cap, and never overflows
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**doublings)
    return rng() * ceiling


def retry_delay(failures: int, *, rejected: bool, rng: Callable[[], float]) -> float:
    """Seconds until the next token request after `failures` failed ones in a row; a refused
    credential is retried at the slow end of the backoff (its secret may be rotated any time,
    and a new one is tried at once: TokenSource.use)."""
    if rejected:
        return BACKOFF_CAP / 2 + rng() * BACKOFF_CAP / 2
    return backoff_delay(failures, rng=rng)


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and the monotonic-clock times that govern its use; `version` names its
    publication in the token store, and `stamp` is `obtained_at` on the store's wall clock."""

    value: str = field(repr=False)
    obtained_at: float
    lifetime: float
    scope: str | None = None
    version: str = ""
    stamp: float = 0.0
    # Set once from the fields above: every request asks whether the token is still usable.
    usable_until: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        margin = min(SAFETY_MARGIN_CAP, SAFETY_MARGIN_FRACTION * self.lifetime)
        object.__setattr__(self, "usable_until", self.expires_at - margin)

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @property
    def refresh_at(self) -> float:
        return self.obtained_at + REFRESH_FRACTION * self.lifetime

    def usable(self, now: float) -> bool:
        return now < self.usable_until

    @classmethod
    def of_shared(cls, shared: SharedToken, *, now: float, wall: float) -> Token:
        """The token a store holds, on the monotonic clock that reads `now` at `wall`."""
        return cls(
            value=shared.value,
            obtained_at=shared.obtained_at - wall + now,
            lifetime=shared.expires_at - shared.obtained_at,
            scope=shared.scope,
            version=shared.version,
            stamp=shared.obtained_at,
        )


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """A token source's token and failure state; `retry_at` is on the monotonic clock."""

    token: Token | None
    failures: int = 0
    last_error: str | None = None
    last_error_description: str | None = None
    rejected: bool = False
    retry_at: float | None = None

    @classmethod
    def of(
        cls, token: Token | None, failure: FetchFailure | None, *, now: float, wall: float
    ) -> TokenStatus:
        """A token and the failure state a store holds, on the clock that reads `now` at
        `wall`."""
        if failure is None:
            return cls(token=token)
        return cls(
            token=token,
            failures=failure.failures,
            last_error=failure.error,
            last_error_description=failure.detail,
            rejected=failure.rejected,
            retry_at=failure.retry_at - wall + now,
        )

    def state(self, now: float) -> dict[str, Any]:
        """What /-/ready shows of this credential at `now`: never the token itself."""
        token = self.token
        usable = token is not None and token.usable(now)
        return {
            "ready": usable,
            "expires_in": round(token.expires_at - now, 1) if token is not None else None,
            "last_error": self.last_error,
            "last_error_description": self.last_error_description,
            "consecutive_failures": self.failures,
            "next_retry_in": (
                round(max(0.0, self.retry_at - now), 1)
                if self.retry_at is not None and not usable
                else None
            ),
        }

    def rejected_error(self, name: str, now: float) -> ClientRejected:
        """The 503 once the token endpoint refused the credential of `name`."""
        answered = oauth_error(self.last_error or "invalid_client", self.last_error_description)
        return ClientRejected(
            f"the token endpoint rejected the client credentials of {name!r} with "
            f"{answered}; check client_id and client_secret",
            retry_after=self._retry_after(now),
        )

    def unavailable_error(self, name: str, waited: float, now: float) -> TokenUnavailable:
        """The 503 when no usable token of `name` came within `waited` seconds."""
        error = self.last_error
        reason = (
            f" (last error: {oauth_error(error, self.last_error_description)})" if error else ""
        )
        return TokenUnavailable(
            f"no usable access token for credential {name!r} within {waited:g} s{reason}",
            retry_after=self._retry_after(now),
        )

    def _retry_after(self, now: float) -> int:
        if self.retry_at is None:
            return 1
        return max(1, round(self.retry_at - now))


class TokenSource(Protocol):
    """Where the forwarder gets a credential's token (a TokenManager), and what a reload that
    keeps the credential tells it."""

    name: str

    def start(self) -> None: ...

    async def close(self) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def status(self) -> TokenStatus: ...

    def usable_token(self) -> Token | None: ...

    async def token(self) -> Token: ...

    def age(self, token: Token) -> float: ...

    def invalidate(self, token: Token, *, path: str, replayable: bool) -> bool: ...

    def replayed(self, path: str, *, rejected: bool) -> None: ...

    def use(
        self,
        credential: Credential,
        *,
        request_timeout: float,
        wait_timeout: float,
        store: TokenStore | None = None,
    ) -> None:
        """A reload kept this source: the same credential, perhaps with a new secret, and
        perhaps a new `store` of its token (see TokenManager.use)."""
        ...

    async def wait_changed(self) -> None:
        """Return at the next new token or failed token request."""
        ...
