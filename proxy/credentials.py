"""TokenManager: one access token per credential, fetched eagerly, refreshed in the background,
single flight, exponential backoff with full jitter, and dropped when upstream rejects it
(unless the path that rejected it refuses every token, see proxy.refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp

from proxy.config import Credential
from proxy.errors import ClientRejected, TokenEndpointError, TokenUnavailable
from proxy.log import get_logger, redactor
from proxy.metrics import Metrics
from proxy.oauth import basic_credentials, oauth_error, request_token
from proxy.refusals import REMEMBER_FOR, Evidence, Refusal, RefusingPaths

log = get_logger("proxy.credentials")

REFRESH_FRACTION = 0.8
SAFETY_MARGIN_CAP = 30.0
SAFETY_MARGIN_FRACTION = 0.1
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and the monotonic-clock times that govern its use."""

    value: str = field(repr=False)
    obtained_at: float
    lifetime: float
    scope: str | None = None

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @property
    def usable_until(self) -> float:
        margin = min(SAFETY_MARGIN_CAP, SAFETY_MARGIN_FRACTION * self.lifetime)
        return self.expires_at - margin

    @property
    def refresh_at(self) -> float:
        return self.obtained_at + REFRESH_FRACTION * self.lifetime

    def usable(self, now: float) -> bool:
        return now < self.usable_until


def backoff_delay(attempt: int, *, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    doublings = min(max(0, attempt - 1), 32)  # 2**32 s is far past the cap, and never overflows
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**doublings)
    return rng() * ceiling


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """A TokenManager's state as a copy of it in another process needs it (see TokenReplica)."""

    token: Token | None
    failures: int = 0
    last_error: str | None = None
    last_error_description: str | None = None
    rejected: bool = False
    retry_at: float | None = None


class TokenSource(Protocol):
    """Where the forwarder gets a credential's token: a TokenManager in this process, or (with
    several workers) a copy of the token the supervisor process holds."""

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


def _register_secrets(credential: Credential) -> None:
    """The secret in every form a log line could show it: plain, form-encoded, Basic."""
    secret = credential.client_secret.get_secret_value()
    redactor.add_secret(secret)
    redactor.add_secret(quote_plus(secret))
    redactor.add_secret(basic_credentials(credential.client_id, secret))


class _TokenHolder:
    """What TokenManager and TokenReplica share: /-/ready's view, the wait for a usable token
    and the errors it ends in, all read from `status()` and the `_changed` event."""

    name: str
    _wait_timeout: float
    _clock: Callable[[], float]
    _changed: asyncio.Event

    def status(self) -> TokenStatus:
        raise NotImplementedError

    def _current(self) -> Token | None:
        """The token held now, usable or not (the hot path: no TokenStatus is built)."""
        raise NotImplementedError

    def _want_token(self) -> None:
        """No usable token is here and a request waits: get one now if none is on its way."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What /-/ready shows of this credential: never the token itself."""
        now = self._clock()
        status = self.status()
        token = status.token
        usable = token is not None and token.usable(now)
        return {
            "ready": usable,
            "expires_in": round(token.expires_at - now, 1) if token is not None else None,
            "last_error": status.last_error,
            "last_error_description": status.last_error_description,
            "consecutive_failures": status.failures,
            "next_retry_in": (
                round(max(0.0, status.retry_at - now), 1)
                if status.retry_at is not None and not usable
                else None
            ),
        }

    def usable_token(self) -> Token | None:
        """The current token if it is usable now; None: await token() (the hot path, no wait)."""
        token = self._current()
        return token if token is not None and token.usable(self._clock()) else None

    async def token(self) -> Token:
        """The current usable token, waiting up to wait_timeout for one to arrive."""
        token = self.usable_token()
        if token is not None:
            return token
        self._want_token()
        try:
            async with asyncio.timeout(self._wait_timeout):
                while True:
                    if self.status().rejected:
                        raise self._rejected()
                    changed = self._changed
                    await changed.wait()
                    token = self._current()
                    if token is not None and token.usable(self._clock()):
                        return token
        except TimeoutError:
            raise self._unavailable() from None

    def age(self, token: Token) -> float:
        """Seconds since `token` was requested (monotonic time is the same in every process)."""
        return self._clock() - token.obtained_at

    def _rejected(self) -> ClientRejected:
        status = self.status()
        answered = oauth_error(status.last_error or "invalid_client", status.last_error_description)
        return ClientRejected(
            f"the token endpoint rejected the client credentials of {self.name!r} with "
            f"{answered}; check client_id and client_secret",
            retry_after=self._retry_after(),
        )

    def _unavailable(self) -> TokenUnavailable:
        status = self.status()
        error = status.last_error
        reason = (
            f" (last error: {oauth_error(error, status.last_error_description)})" if error else ""
        )
        return TokenUnavailable(
            f"no usable access token for credential {self.name!r} within "
            f"{self._wait_timeout:g} s{reason}",
            retry_after=self._retry_after(),
        )

    def _retry_after(self) -> int:
        retry_at = self.status().retry_at
        if retry_at is None:
            return 1
        return max(1, round(retry_at - self._clock()))


class TokenManager(_TokenHolder):
    """Holds the current token of one credential and keeps it fresh."""

    def __init__(
        self,
        *,
        name: str,
        credential: Credential,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        request_timeout: float = 10.0,
        wait_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._credential = credential
        self._session = session
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._wait_timeout = wait_timeout
        self._clock = clock
        self._rng = rng
        self._token: Token | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._last_error: TokenEndpointError | None = None
        self._next_attempt_at: float | None = None
        self._paths = RefusingPaths(clock=clock, on_refused=self._log_refused)
        _register_secrets(credential)
        metrics.token_expiry.labels(name).set(0)
        metrics.refresh_failures.labels(name).set(0)
        metrics.token_expires_in.labels(name).set_function(self._seconds_left)

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"token manager {self.name!r} is already started")
        self._task = asyncio.create_task(self._run(), name=f"token-refresh:{self.name}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def ready(self) -> bool:
        token = self._token
        return token is not None and token.usable(self._clock())

    def status(self) -> TokenStatus:
        """The token and the failure state, for the workers' copies of this manager."""
        error = self._last_error
        return TokenStatus(
            token=self._token,
            failures=self._failures,
            last_error=error.error if error is not None else None,
            last_error_description=error.description if error is not None else None,
            rejected=error is not None and error.rejects_client,
            retry_at=self._next_attempt_at,
        )

    async def wait_changed(self) -> None:
        """Return at the next new token or failed token request."""
        await self._changed.wait()

    def _current(self) -> Token | None:
        return self._token

    def _want_token(self) -> None:
        if self._failures == 0:
            self._wake.set()  # during a backoff the next attempt is already scheduled

    def invalidate(self, token: Token, *, path: str, replayable: bool) -> bool:
        """Upstream answered 401 to `token` at `path` (its URL without the query): drop the
        token and fetch a new one now (single flight), unless what that path showed says a new
        token will not help. True when a newer token is on its way or already here, so that a
        replay can carry it; False: the 401 goes to the client as it is."""
        return self._on_401(
            path, token.obtained_at, current=self._token is token, replayable=replayable
        )

    def relayed_401(self, obtained_at: float, *, path: str, replayable: bool) -> None:
        """invalidate() for a worker, which names its token by the time it was obtained."""
        token = self._token
        current = token is not None and token.obtained_at == obtained_at
        self._on_401(path, obtained_at, current=current, replayable=replayable)

    def replayed(self, path: str, *, rejected: bool) -> None:
        """The replay at `path`, with a token newer than the one rejected, was answered:
        rejected too (a user-token endpoint, say: for a while its 401s drop no token and are
        not replayed), or not (a revoked token, which the new one replaced)."""
        self._paths.replayed(path, rejected=rejected)

    def _on_401(self, path: str, obtained_at: float, *, current: bool, replayable: bool) -> bool:
        if self._paths.spares(path, obtained_at=obtained_at, replayable=replayable):
            return False
        if not current:
            return True
        self._paths.dropped(path, obtained_at=obtained_at, replayable=replayable)
        self._token = None
        log.info("token rejected upstream, fetching a new one", credential=self.name)
        self._wake.set()
        return True

    def _log_refused(self, path: str) -> None:
        log.info(
            "upstream rejected a fresh token too; this path's 401s go to the client for a while",
            credential=self.name,
            path=path,
            seconds=REMEMBER_FOR,
        )

    def remembered(self, path: str) -> Refusal | None:
        """What a worker should hold of `path` (the supervisor tells them); a replay under way
        stays here, where every worker's 401s are decided."""
        known = self._paths.get(path)
        return None if known is None or known.evidence is Evidence.REPLAYING else known

    def refusals(self) -> list[tuple[str, Refusal]]:
        """Every path remembered() would tell of (for a worker that starts late)."""
        paths = self._paths.items()
        return [(path, known) for path, known in paths if known.evidence is not Evidence.REPLAYING]

    async def fetch(self) -> Token:
        """One token request, as RFC 6749 4.4 describes it; raises TokenEndpointError."""
        started = self._clock()
        issued = await request_token(
            self._session, self._credential, request_timeout=self._request_timeout
        )
        redactor.add_token(issued.value)
        return Token(
            value=issued.value, obtained_at=started, lifetime=issued.expires_in, scope=issued.scope
        )

    async def _run(self) -> None:
        while True:
            try:
                token = await self.fetch()
            except TokenEndpointError as exc:
                delay = self._record_failure(exc)
                await self._sleep(delay, wakeable=False)
                continue
            except Exception as exc:  # the refresh loop must outlive any bug
                log.exception("unexpected error while fetching a token", credential=self.name)
                delay = self._record_failure(
                    TokenEndpointError(type(exc).__name__, error="internal_error")
                )
                await self._sleep(delay, wakeable=False)
                continue
            self._install(token)
            await self._sleep(token.refresh_at - self._clock(), wakeable=True)

    def _install(self, token: Token) -> None:
        self._token = token
        self._failures = 0
        self._last_error = None
        self._next_attempt_at = None
        self._metrics.token_fetches.labels(self.name, "success").inc()
        self._metrics.refresh_failures.labels(self.name).set(0)
        self._metrics.token_expiry.labels(self.name).set(
            time.time() + token.expires_at - self._clock()
        )
        log.info(
            "token fetched",
            credential=self.name,
            expires_in=round(token.lifetime),
            scope=token.scope,
        )
        self._notify()
        refresh_in = token.refresh_at - self._clock()
        log.info(
            "token refresh scheduled",
            credential=self.name,
            refresh_in=round(refresh_in, 1),
            refresh_at=datetime.fromtimestamp(time.time() + refresh_in, UTC).isoformat(),
        )

    def _record_failure(self, exc: TokenEndpointError) -> float:
        self._failures += 1
        self._last_error = exc
        rejected = exc.rejects_client
        if rejected:
            # The secret may be rotated at any time: keep trying, at the slow end of the backoff.
            delay = BACKOFF_CAP / 2 + self._rng() * BACKOFF_CAP / 2
        else:
            delay = backoff_delay(self._failures, rng=self._rng)
        self._next_attempt_at = self._clock() + delay
        self._metrics.token_fetches.labels(self.name, "rejected" if rejected else "error").inc()
        self._metrics.refresh_failures.labels(self.name).set(self._failures)
        event = dict(
            credential=self.name,
            error=exc.error,
            status=exc.status_code,
            attempt=self._failures,
            retry_in=round(delay, 2),
        )
        if rejected:
            log.error(
                "the token endpoint rejected the client credentials; check client_id and "
                "client_secret of this credential",
                detail=exc.detail,
                **event,
            )
        else:
            log.warning("token request failed", detail=exc.detail, **event)
        self._notify()
        return delay

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _sleep(self, delay: float, *, wakeable: bool) -> None:
        self._wake.clear()
        if delay <= 0:
            return
        if not wakeable:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _seconds_left(self) -> float:
        token = self._token
        return max(0.0, token.expires_at - self._clock()) if token is not None else 0.0


class TokenReplica(_TokenHolder):
    """A worker process's copy of one credential's token, which the supervisor's TokenManager
    fetches and refreshes for every worker: `apply` installs what the supervisor sends, and
    `ask` carries this copy's requests back (fetch now, drop a token upstream rejected, how a
    replay was answered). It answers the forwarder as the TokenManager would, and the 401
    rule's memory of paths is the supervisor's: it decides each drop for the group, and the
    worker's link copies what it learnt into `paths`."""

    def __init__(
        self,
        *,
        name: str,
        credential: Credential,
        ask: Callable[[dict[str, Any]], None],
        paths: RefusingPaths | None = None,
        wait_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._ask = ask
        self._wait_timeout = wait_timeout
        self._clock = clock
        self._status = TokenStatus(token=None)
        self._changed = asyncio.Event()
        self._asked = False
        self._paths = paths if paths is not None else RefusingPaths(clock=clock)
        _register_secrets(credential)

    def start(self) -> None:
        """Nothing to start: the supervisor keeps the token fresh."""

    async def close(self) -> None:
        """Nothing to close: the supervisor owns the token."""

    def apply(self, status: TokenStatus) -> None:
        """Install the supervisor's latest word on this credential, and wake any waiter."""
        if status.token is not None:
            redactor.add_token(status.token.value)
        self._status = status
        self._asked = False
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self) -> TokenStatus:
        return self._status

    def _current(self) -> Token | None:
        return self._status.token

    def _want_token(self) -> None:
        if self._status.failures == 0 and not self._asked:
            self._asked = True
            self._ask({"ask": "token", "credential": self.name})

    def invalidate(self, token: Token, *, path: str, replayable: bool) -> bool:
        """As TokenManager.invalidate, for the whole group: the supervisor drops the token and
        fetches one new one, unless what any worker showed of `path` says otherwise (then it
        sends the same token back, and what it knows of the path)."""
        if self._paths.spares(path, obtained_at=token.obtained_at, replayable=replayable):
            return False
        status = self._status
        current = status.token
        if current is None or current.obtained_at != token.obtained_at:
            return True
        self._status = replace(status, token=None)
        self._ask(
            {
                "ask": "invalidate",
                "credential": self.name,
                "obtained_at": token.obtained_at,
                "path": path,
                "replayable": replayable,
            }
        )
        return True

    def replayed(self, path: str, *, rejected: bool) -> None:
        """As TokenManager.replayed; the supervisor tells every worker of a refusing path."""
        if rejected:
            known = self._paths.get(path)
            if known is not None and known.evidence is Evidence.REFUSED:
                return  # the supervisor knows: it told this worker, or this worker told it
            self._paths.replayed(path, rejected=True)
        self._ask({"ask": "replayed", "credential": self.name, "path": path, "rejected": rejected})
