"""TokenManager: a credential's token in memory, kept through its token store (proxy.store):
fetched eagerly and at 80 % of its life by whoever takes the store's lock, retried with full
jitter, and dropped on upstream's 401 unless the path refuses every token (proxy.refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp

from proxy.config import Credential
from proxy.config.egress import EgressProxy
from proxy.egress import AiohttpVia
from proxy.errors import TokenEndpointError
from proxy.log import get_logger, redactor
from proxy.metrics import Metrics
from proxy.oauth import request_token, secret_forms
from proxy.refusals import REMEMBER_FOR, Evidence, Refusal
from proxy.store import FetchFailure, StoreUnavailable, TokenSnapshot, TokenStore
from proxy.tokens import Token, TokenStatus, retry_delay

log = get_logger("proxy.credentials")

# The fetch lock outlives the longest token request by this much, then frees itself.
LOCK_MARGIN = 5.0
# Without the lock a manager looks again this often: a holder that died wakes nobody.
LOCK_WAIT = 1.0
# After the store failed to answer, the next try comes this much later.
STORE_RETRY = 1.0
REFUSED = Evidence.REFUSED


class TokenManager:
    """Holds the current token of one credential in memory, and keeps it fresh through its
    token store: requests read the memory only, the background task alone talks to the store.

    `metrics` None: another process exports this credential's token metrics (a worker's
    supervisor). `clock` is monotonic, `wall` the store's clock; `sleep` waits on `clock`."""

    def __init__(
        self,
        *,
        name: str,
        credential: Credential,
        session: aiohttp.ClientSession,
        store: TokenStore,
        metrics: Metrics | None,
        request_timeout: float = 10.0,
        egress: EgressProxy | None = None,
        wait_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._credential = credential
        self._session = session
        self._store = store
        # The egress proxy the token requests go through (None: direct).
        self._via = AiohttpVia.of(egress, credential.token_url.partition(":")[0])
        self._paths = store.paths
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._wait_timeout = wait_timeout
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._rng = rng
        self._token: Token | None = None
        self._failure: FetchFailure | None = None
        # The version of the last token dropped here: the store may still hold it a moment.
        self._dropped = ""
        # The token in hand when the store was replaced, for the new one (see use()).
        self._carried: Token | None = None
        # What requests left for the background task to tell the store, in order.
        self._drops: list[tuple[Token, str]] = []
        self._refusing: list[str] = []
        # Set by a new secret: the failure state it found (`_retry_from`) predates it, so its
        # wait is over; a failure recorded since (by any process) came after it.
        self._retry = False
        self._retry_from: FetchFailure | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for form in secret_forms(credential):
            redactor.add_secret(form)
        if metrics is not None:
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

    def use(
        self,
        credential: Credential,
        *,
        request_timeout: float,
        wait_timeout: float,
        store: TokenStore | None = None,
    ) -> None:
        """A reload's credential (same identity) and timeouts, from the next fetch on: the
        token in hand stays until its refresh; after a failed fetch (a refused secret, or one
        backing off) a new secret is tried at once. `store`: the token store from now on (a
        new Redis, or the same one keyed by a new secret), which gets the token in hand."""
        for form in secret_forms(credential):
            redactor.add_secret(form)
        changed = credential.client_secret != self._credential.client_secret
        self._credential = credential
        self._request_timeout = request_timeout
        self._wait_timeout = wait_timeout
        if store is not None and store is not self._store:
            self._store, self._paths, self._carried = store, store.paths, self._token
            self._wake.set()
        if changed:
            self._retry, self._retry_from = True, self._failure
            self._wake.set()

    async def wait_changed(self) -> None:
        """Return at the next new token or failed token request."""
        await self._changed.wait()

    @property
    def ready(self) -> bool:
        token = self._token
        return token is not None and token.usable(self._clock())

    # What requests read -------------------------------------------------------------------------

    def usable_token(self) -> Token | None:
        """The current token if it is usable now; None: await token() (the hot path, no wait)."""
        token = self._token
        return token if token is not None and token.usable(self._clock()) else None

    async def token(self) -> Token:
        """The current usable token, waiting up to wait_timeout for one to arrive."""
        token = self.usable_token()
        if token is not None:
            return token
        if self._failure is None:
            self._wake.set()  # during a backoff the next attempt is already scheduled
        try:
            async with asyncio.timeout(self._wait_timeout):
                while True:
                    if self._failure is not None and self._failure.rejected:
                        raise self.status().rejected_error(self.name, self._clock())
                    await self._changed.wait()
                    token = self.usable_token()
                    if token is not None:
                        return token
        except TimeoutError:
            status = self.status()
            raise status.unavailable_error(self.name, self._wait_timeout, self._clock()) from None

    def age(self, token: Token) -> float:
        """Seconds since `token` was requested."""
        return self._clock() - token.obtained_at

    def status(self) -> TokenStatus:
        return TokenStatus.of(self._token, self._failure, now=self._clock(), wall=self._wall())

    def state(self) -> dict[str, Any]:
        """What /-/ready shows of this credential: never the token itself."""
        return self.status().state(self._clock())

    # The 401 rule -------------------------------------------------------------------------------

    def invalidate(self, token: Token, *, path: str, replayable: bool) -> bool:
        """Upstream answered 401 to `token` at `path` (its URL without the query): drop the
        token and fetch a new one now (single flight), unless what that path showed says a new
        token will not help. True when a newer token is on its way or already here, so that a
        replay can carry it; False: the 401 goes to the client as it is."""
        paths = self._paths
        known = paths.get(path)
        if paths.spares(path, obtained_at=token.stamp, replayable=replayable):
            self._learnt_refusal(path, known)
            return False
        if self._token is not token:
            return True
        paths.dropped(path, obtained_at=token.stamp, replayable=replayable)
        self._token = None
        self._dropped = token.version
        self._drops.append((token, path))
        log.info("token rejected upstream, fetching a new one", credential=self.name)
        self._wake.set()
        return True

    def replayed(self, path: str, *, rejected: bool) -> None:
        """The replay at `path`, with a token newer than the one rejected, was answered:
        rejected too (a user-token endpoint, say: for a while its 401s drop no token and are
        not replayed), or not (a revoked token, which the new one replaced)."""
        known = self._paths.get(path)
        self._paths.replayed(path, rejected=rejected)
        if rejected:
            self._learnt_refusal(path, known)

    def _learnt_refusal(self, path: str, known: Refusal | None) -> None:
        """Log a path newly found refusing every token (`known`: what was known of it before),
        and have the store share it."""
        if not self._paths.refuses(path) or (known is not None and known.evidence is REFUSED):
            return
        log.info(
            "upstream rejected a fresh token too; this path's 401s go to the client for a while",
            credential=self.name,
            path=path,
            seconds=REMEMBER_FOR,
        )
        self._refusing.append(path)
        self._wake.set()

    # The background task ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except StoreUnavailable as exc:
                log.warning(
                    "the token store did not answer; trying again",
                    credential=self.name,
                    error=exc.detail,
                    kind=exc.kind,
                )
                await self._sleep(STORE_RETRY)
            except Exception:  # the refresh loop must outlive any bug
                log.exception("unexpected error in the token refresh", credential=self.name)
                await self._sleep(STORE_RETRY)

    async def _step(self) -> None:
        """Tell the store what requests learnt, take what it holds, and fetch if a token is
        due and nobody else is fetching it; else wait until something may have changed."""
        self._wake.clear()
        await self._carry()
        await self._tell_store()
        snapshot = await self._store.load()
        self._take(snapshot)
        wait = self._until_due()
        if wait > 0:
            await self._wait(wait, snapshot.generation)
            return
        owner = await self._store.lock(self._request_timeout + LOCK_MARGIN)
        if owner is None:
            await self._wait(LOCK_WAIT, snapshot.generation)
            return
        try:
            self._take(await self._store.load())  # the last holder may have just published
            if self._until_due() <= 0:
                await self._refresh()
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self._store.unlock(owner)

    async def _carry(self) -> None:
        """Give a new store the token in hand, unless it holds one already (another replica's):
        a store that changed costs no token request."""
        token = self._carried
        if token is None:
            return
        snapshot = await self._store.load()
        self._carried = None
        if snapshot.token is None and token.usable(self._clock()) and self._token is token:
            shared = await self._store.publish(
                value=token.value,
                obtained_at=token.stamp,
                expires_at=token.stamp + token.lifetime,
                scope=token.scope,
            )
            self._token = replace(token, version=shared.version)

    def _until_due(self) -> float:
        """Seconds until this manager should fetch: the refresh time of a usable token, or the
        retry time after a failure (whoever's it was); 0 or less: now."""
        now = self._clock()
        token = self._token
        if token is not None and token.usable(now) and now < token.refresh_at:
            return token.refresh_at - now
        failure = self._failure
        if failure is None or self._retry:
            return 0.0
        return failure.retry_at - self._wall()

    async def _wait(self, seconds: float, generation: int) -> None:
        """Until `seconds` have passed, the store changed after `generation`, or a request
        woke this task."""
        waits = [
            asyncio.ensure_future(self._sleep(seconds)),
            asyncio.ensure_future(self._store.wait_changed(generation)),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            # A store that failed while waited on fails the next call too: that one reports it.
            await asyncio.gather(*waits, return_exceptions=True)

    async def _tell_store(self) -> None:
        while self._refusing:
            # Shared as it is known now: it may have run out, or be another's by now.
            known = self._paths.get(self._refusing[0])
            if known is not None and known.evidence is REFUSED:
                left = known.until - self._wall()
                await self._store.remember_refusing(self._refusing[0], left)
            del self._refusing[0]
        while self._drops:
            token, path = self._drops[0]
            if await self._store.refuses(path):
                # Another process found that path refusing: the token stays, for every one.
                self._paths.refuse(path, seconds=REMEMBER_FOR)
                if self._token is None and self._dropped == token.version:
                    self._token, self._dropped = token, ""
                    self._notify()
            else:
                await self._store.drop(token.version)
            del self._drops[0]

    def _take(self, snapshot: TokenSnapshot) -> None:
        """Hold what the store holds: its token (a newer one, or none once it was dropped),
        and its failure state."""
        shared, mine = snapshot.token, self._token
        if shared is None or shared.version == self._dropped:
            token = None
        elif mine is not None and mine.version == shared.version:
            token = mine
        else:
            redactor.add_token(shared.value)
            token = Token.of_shared(shared, now=self._clock(), wall=self._wall())
            if self._metrics is not None:
                self._metrics.token_expiry.labels(self.name).set(shared.expires_at)
        changed = token is not mine or snapshot.failure != self._failure
        self._token, self._failure = token, snapshot.failure
        if snapshot.failure is None or snapshot.failure != self._retry_from:
            self._retry = False  # a token, or a failure since the new secret: no retry now
        if changed:
            self._notify()

    async def fetch(self) -> Token:
        """One token request, as RFC 6749 4.4 describes it; raises TokenEndpointError."""
        started = self._clock()
        issued = await request_token(
            self._session, self._credential, request_timeout=self._request_timeout, via=self._via
        )
        redactor.add_token(issued.value)
        return Token(
            value=issued.value, obtained_at=started, lifetime=issued.expires_in, scope=issued.scope
        )

    async def _refresh(self) -> None:
        self._retry = False  # a secret that arrives during this fetch is tried after it
        try:
            token = await self.fetch()
        except TokenEndpointError as exc:
            await self._failed(exc)
            return
        except Exception as exc:  # the refresh loop must outlive any bug
            log.exception("unexpected error while fetching a token", credential=self.name)
            await self._failed(TokenEndpointError(type(exc).__name__, error="internal_error"))
            return
        stamp = token.obtained_at + self._wall() - self._clock()
        expires_at, scope = stamp + token.lifetime, token.scope
        shared = await self._store.publish(
            value=token.value, obtained_at=stamp, expires_at=expires_at, scope=scope
        )
        self._install(replace(token, version=shared.version, stamp=stamp))

    def _install(self, token: Token) -> None:
        self._token, self._dropped, self._failure = token, "", None
        metrics = self._metrics
        if metrics is not None:
            metrics.token_fetches.labels(self.name, "success").inc()
            metrics.refresh_failures.labels(self.name).set(0)
            metrics.token_expiry.labels(self.name).set(token.stamp + token.lifetime)
        name, expires_in = self.name, round(token.lifetime)
        log.info("token fetched", credential=name, expires_in=expires_in, scope=token.scope)
        self._notify()
        refresh_in = token.refresh_at - self._clock()
        refresh_at = datetime.fromtimestamp(self._wall() + refresh_in, UTC).isoformat()
        log.info(
            "token refresh scheduled",
            credential=name,
            refresh_in=round(refresh_in, 1),
            refresh_at=refresh_at,
        )

    async def _failed(self, exc: TokenEndpointError) -> None:
        """Share a failed token request: the failures in a row (the group's), and when the
        next attempt is due."""
        failures = (self._failure.failures if self._failure is not None else 0) + 1
        rejected = exc.rejects_client
        delay = retry_delay(failures, rejected=rejected, rng=self._rng)
        self._failure = FetchFailure(
            failures=failures,
            error=exc.error,
            retry_at=self._wall() + delay,
            rejected=rejected,
            detail=exc.description,
        )
        metrics = self._metrics
        if metrics is not None:
            metrics.token_fetches.labels(self.name, "rejected" if rejected else "error").inc()
            metrics.refresh_failures.labels(self.name).set(failures)
        event: dict[str, Any] = {"credential": self.name, "error": exc.error, "detail": exc.detail}
        event.update(status=exc.status_code, attempt=failures, retry_in=round(delay, 2))
        if rejected:
            log.error(
                "the token endpoint rejected the client credentials; check client_id and "
                "client_secret of this credential",
                **event,
            )
        else:
            log.warning("token request failed", **event)
        self._notify()
        await self._store.record_failure(self._failure)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _seconds_left(self) -> float:
        token = self._token
        return max(0.0, token.expires_at - self._clock()) if token is not None else 0.0
