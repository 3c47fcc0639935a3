"""TokenManager, Token, backoff_delay, parse_token_response and the 401 rule's memory of paths,
against the fake token server."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from proxy.config import Credential
from proxy.credentials import TokenManager
from proxy.errors import ClientRejected, TokenEndpointError, TokenUnavailable
from proxy.log import REDACTED, get_logger, redactor
from proxy.metrics import Metrics
from proxy.oauth import parse_token_response, request_token
from proxy.refusals import REMEMBER_FOR, Evidence, Refusal, RefusingPaths
from proxy.store import FetchFailure, MemoryStore, TokenStore
from proxy.store.memory import MemoryTokens
from proxy.token_sources import identity_of
from proxy.tokens import Token, backoff_delay
from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    CapturedLog,
    FakeTokenServer,
    free_port,
    wait_for,
)

# An id and a secret with every character RFC 6749 2.3.1 form-urlencoding changes.
ODD_ID = "my:id+x y%z"
ODD_SECRET = "p:a+s s%w/rd=&?"


def make_credential(token_server: FakeTokenServer, **overrides: Any) -> Credential:
    values: dict[str, Any] = {
        "client_id": TEST_CLIENT_ID,
        "client_secret": TEST_SECRET,
        "token_url": token_server.url,
    }
    values.update(overrides)
    return Credential.model_validate(values)


class FakeTime:
    """A clock that a test moves by hand, and a sleep that ends once the clock reaches its end."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> Awaitable[None]:
        # The end is set when sleep is called, as the manager's clock read it then.
        return self._until(self.now + seconds)

    async def _until(self, end: float) -> None:
        while self.now < end:
            await self._moved.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


@asynccontextmanager
async def token_manager(
    credential: Credential,
    *,
    start: bool = False,
    wait_timeout: float = 5.0,
    request_timeout: float = 5.0,
    rng: Callable[[], float] = lambda: 0.0,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    store: TokenStore | None = None,
) -> AsyncIterator[TokenManager]:
    """A TokenManager on `store`, else on a memory store of its own whose clock is `wall`."""
    if store is None:
        store = MemoryStore(clock=wall).tokens(
            identity_of(credential), credential.client_secret.get_secret_value()
        )
    async with aiohttp.ClientSession() as session:
        manager = TokenManager(
            name="default",
            credential=credential,
            session=session,
            store=store,
            metrics=Metrics(),
            request_timeout=request_timeout,
            wait_timeout=wait_timeout,
            rng=rng,
            clock=clock,
            wall=wall,
            sleep=sleep,
        )
        if start:
            manager.start()
        try:
            yield manager
        finally:
            await manager.close()


def json_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


# --- 1. the token request -------------------------------------------------------------------


async def test_token_request_is_form_post_with_client_credentials_grant(
    token_server: FakeTokenServer,
) -> None:
    """The token request is a form-urlencoded POST with just grant_type=client_credentials."""
    async with token_manager(make_credential(token_server)) as manager:
        token = await manager.fetch()
    assert len(token_server.requests) == 1  # the fake token server only routes POST
    sent = token_server.requests[0]
    assert sent.headers["Content-Type"].split(";")[0] == "application/x-www-form-urlencoded"
    assert sent.form == {"grant_type": "client_credentials"}
    assert token.value == token_server.issued[0]


async def test_basic_auth_form_urlencodes_id_and_secret(token_server: FakeTokenServer) -> None:
    """client_secret_basic form-urlencodes id and secret before Base64 (RFC 6749 2.3.1)."""
    credential = make_credential(
        token_server, client_id=ODD_ID, client_secret=ODD_SECRET, auth_method="client_secret_basic"
    )
    async with token_manager(credential) as manager:
        await manager.fetch()
    sent = token_server.requests[0]
    scheme, _, encoded = sent.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "my%3Aid%2Bx+y%25z:p%3Aa%2Bs+s%25w%2Frd%3D%26%3F"
    assert sent.basic_credentials == (ODD_ID, ODD_SECRET)
    assert "client_secret" not in sent.form
    assert "client_id" not in sent.form


async def test_basic_auth_leaves_plain_ids_unchanged(token_server: FakeTokenServer) -> None:
    """A Battle.net-style hex id and alphanumeric secret go into the Basic header as they are."""
    credential = make_credential(
        token_server, client_id="0123456789abcdef0123456789abcdef", client_secret="AbCdEf0123456789"
    )
    async with token_manager(credential) as manager:
        await manager.fetch()
    encoded = token_server.requests[0].headers["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(encoded) == b"0123456789abcdef0123456789abcdef:AbCdEf0123456789"


async def test_client_secret_post_sends_credentials_in_form(token_server: FakeTokenServer) -> None:
    """client_secret_post sends client_id and client_secret in the form, no Authorization."""
    credential = make_credential(
        token_server, client_id=ODD_ID, client_secret=ODD_SECRET, auth_method="client_secret_post"
    )
    async with token_manager(credential) as manager:
        await manager.fetch()
    sent = token_server.requests[0]
    assert "Authorization" not in sent.headers
    assert sent.form == {
        "grant_type": "client_credentials",
        "client_id": ODD_ID,
        "client_secret": ODD_SECRET,
    }


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_scope_sent_only_when_set(token_server: FakeTokenServer, auth_method: str) -> None:
    """scope is absent from the form when unset, and sent as configured when set."""
    async with token_manager(make_credential(token_server, auth_method=auth_method)) as manager:
        await manager.fetch()
    scoped = make_credential(token_server, auth_method=auth_method, scope="wow.profile sc2.profile")
    async with token_manager(scoped) as manager:
        await manager.fetch()
    assert "scope" not in token_server.requests[0].form
    assert token_server.requests[1].form["scope"] == "wow.profile sc2.profile"


async def test_extra_params_are_sent(token_server: FakeTokenServer) -> None:
    """Every extra_params entry is sent in the token request's form, next to grant_type."""
    credential = make_credential(
        token_server, extra_params={"audience": "https://api.example.com", "resource": "a b&c"}
    )
    async with token_manager(credential) as manager:
        await manager.fetch()
    assert token_server.requests[0].form == {
        "grant_type": "client_credentials",
        "audience": "https://api.example.com",
        "resource": "a b&c",
    }


async def test_fetch_reports_lifetime_and_scope(token_server: FakeTokenServer) -> None:
    """fetch() returns the issued token with the server's expires_in and scope."""
    token_server.expires_in = 86399
    token_server.scope = "wow.profile"
    async with token_manager(make_credential(token_server)) as manager:
        before = time.monotonic()
        token = await manager.fetch()
    assert token.value == token_server.issued[0]
    assert token.lifetime == 86399
    assert token.scope == "wow.profile"
    assert before <= token.obtained_at <= time.monotonic()


async def test_fetch_without_expires_in_means_one_hour(token_server: FakeTokenServer) -> None:
    """A token answer without expires_in gives the token a 3600 s lifetime."""
    token_server.expires_in = None
    async with token_manager(make_credential(token_server)) as manager:
        token = await manager.fetch()
    assert token.lifetime == 3600


# --- 2. parsing the answer ------------------------------------------------------------------


def test_parse_missing_expires_in_means_3600() -> None:
    """parse_token_response gives 3600 s when expires_in is missing (RFC 6749 5.1 default here)."""
    body = json_body({"access_token": "abc", "token_type": "bearer"})
    assert parse_token_response(200, "application/json", body) == ("abc", 3600.0, None)


def test_parse_reads_expires_in_and_scope() -> None:
    """parse_token_response returns the token, its expires_in and its scope."""
    body = json_body(
        {"access_token": "abc", "token_type": "Bearer", "expires_in": 86399, "scope": "x y"}
    )
    assert parse_token_response(200, "application/json", body) == ("abc", 86399.0, "x y")


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (200, "text/html", b"<!doctype html><title>Login</title>"),
        (200, "text/plain", b"access_token=abc&token_type=bearer"),
        (503, "", b""),
        (500, "application/json", b"\xff\xfe\x00garbage"),
        (200, "application/json", b'["access_token", "abc"]'),
        (200, "application/json", b"null"),
    ],
)
def test_parse_non_json_answer_raises_with_status(
    status: int, content_type: str, body: bytes
) -> None:
    """An answer that is not a JSON object raises TokenEndpointError carrying the status code."""
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(status, content_type, body)
    assert caught.value.status_code == status
    assert str(status) in str(caught.value)
    assert not caught.value.rejects_client


@pytest.mark.parametrize(
    ("error", "rejects"),
    [
        ("invalid_client", True),
        ("unauthorized_client", True),
        ("invalid_request", False),
        ("invalid_grant", False),
        ("invalid_scope", False),
        ("unsupported_grant_type", False),
    ],
)
@pytest.mark.parametrize("status", [400, 401])
def test_parse_error_response_is_reported_by_name(error: str, rejects: bool, status: int) -> None:
    """An RFC 6749 5.2 error is reported by name and description; only client errors reject."""
    body = json_body({"error": error, "error_description": "Client authentication failed"})
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(status, "application/json", body)
    assert caught.value.error == error
    assert error in str(caught.value)
    assert "Client authentication failed" in str(caught.value)
    assert caught.value.status_code == status
    assert caught.value.rejects_client is rejects


@pytest.mark.parametrize("status", [400, 401])
def test_parse_error_keeps_code_and_description_as_sent(status: int) -> None:
    """The error code and error_description are kept as the endpoint sent them, for the 503's
    detail and /-/ready."""
    body = json_body(
        {"error": "invalid_client", "error_description": "Client authentication failed: id x"}
    )
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(status, "application/json", body)
    assert caught.value.error == "invalid_client"
    assert caught.value.description == "Client authentication failed: id x"
    assert 'invalid_client ("Client authentication failed: id x")' in caught.value.detail


def test_parse_error_description_is_bounded_printable_and_never_the_secret() -> None:
    """A description that echoes the secret (even where it is cut), holds control characters
    or runs long is kept redacted, printable and at most 200 characters long."""
    redactor.add_secret(TEST_SECRET)
    echoed = f"bad secret {TEST_SECRET}\x1b[31m!"
    straddling = "x" * 190 + TEST_SECRET  # cut at 200 first, it would keep "Sup3r-S3c"
    for text in (echoed, straddling, "y" * 5000):
        body = json_body({"error": TEST_SECRET, "error_description": text})
        with pytest.raises(TokenEndpointError) as caught:
            parse_token_response(401, "application/json", body)
        description = caught.value.description
        assert description is not None
        everything = f"{caught.value} {caught.value.error} {description}"
        assert TEST_SECRET[:8] not in everything
        assert description.isprintable()
        assert len(description) <= 200
    assert caught.value.error == REDACTED
    assert description == "y" * 199 + "\u2026"


def test_parse_error_in_200_answer_is_an_error() -> None:
    """A 200 answer that carries an error member is an error, not a token."""
    body = json_body({"error": "invalid_scope", "access_token": "abc", "token_type": "bearer"})
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(200, "application/json", body)
    assert caught.value.error == "invalid_scope"


def test_parse_success_shape_with_error_status_is_refused() -> None:
    """A token-shaped body under a non-200 status is not taken as a token."""
    body = json_body({"access_token": "abc", "token_type": "bearer", "expires_in": 60})
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(500, "application/json", body)
    assert caught.value.status_code == 500


@pytest.mark.parametrize("token_type", ["mac", "DPoP", "N_A", "", 7])
def test_parse_refuses_non_bearer_token_type(token_type: object) -> None:
    """A token_type other than bearer (any case) is refused: only bearer tokens can be forwarded."""
    body = json_body({"access_token": "abc", "token_type": token_type, "expires_in": 60})
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(200, "application/json", body)
    assert caught.value.error == "unsupported_token_type"


@pytest.mark.parametrize("token_type", ["bearer", "Bearer", "BEARER"])
def test_parse_accepts_bearer_in_any_case(token_type: str) -> None:
    """token_type is matched case-insensitively (RFC 6749 5.1)."""
    body = json_body({"access_token": "abc", "token_type": token_type, "expires_in": 60})
    assert parse_token_response(200, "application/json", body)[0] == "abc"


@pytest.mark.parametrize("expires_in", [0, -1, -3600, "soon", True, [60], {"s": 60}])
def test_parse_refuses_non_positive_expires_in(expires_in: object) -> None:
    """expires_in that is not a positive number is refused."""
    body = json_body({"access_token": "abc", "token_type": "bearer", "expires_in": expires_in})
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(200, "application/json", body)
    assert caught.value.error == "invalid_response"


def test_parse_refuses_nan_expires_in() -> None:
    """expires_in NaN (which Python's json accepts) is refused."""
    body = b'{"access_token": "abc", "token_type": "bearer", "expires_in": NaN}'
    with pytest.raises(TokenEndpointError):
        parse_token_response(200, "application/json", body)


@pytest.mark.parametrize("access_token", [None, "", 42])
def test_parse_refuses_missing_access_token(access_token: object) -> None:
    """A 200 answer without a non-empty string access_token is refused."""
    payload: dict[str, Any] = {"token_type": "bearer", "expires_in": 60}
    if access_token is not None:
        payload["access_token"] = access_token
    with pytest.raises(TokenEndpointError) as caught:
        parse_token_response(200, "application/json", json_body(payload))
    assert caught.value.error == "invalid_response"


@pytest.mark.parametrize(
    "answer",
    [
        lambda: web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html"),
        lambda: web.json_response(
            {"error": "invalid_client", "error_description": "Client authentication failed"},
            status=401,
        ),
        lambda: web.Response(status=401, text="Unauthorized"),
        lambda: web.json_response({"access_token": "abc", "token_type": "mac"}),
        lambda: web.json_response({"access_token": "abc", "expires_in": -5}),
    ],
)
@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_fetch_errors_never_contain_the_secret(
    token_server: FakeTokenServer, answer: Callable[[], web.Response], auth_method: str
) -> None:
    """A failed token request raises TokenEndpointError whose message holds neither the secret
    nor the encoded Basic credentials."""
    token_server.script.append(answer())
    credential = make_credential(token_server, auth_method=auth_method)
    async with token_manager(credential) as manager:
        with pytest.raises(TokenEndpointError) as caught:
            await manager.fetch()
    basic = base64.b64encode(f"{TEST_CLIENT_ID}:{TEST_SECRET}".encode()).decode()
    text = f"{caught.value} {caught.value!r} {caught.value.detail} {caught.value.error}"
    assert TEST_SECRET not in text
    assert basic not in text


async def test_fetch_unreachable_endpoint_is_a_token_endpoint_error() -> None:
    """An unreachable token endpoint raises TokenEndpointError (not a crash) without the secret."""
    credential = Credential.model_validate(
        {
            "client_id": TEST_CLIENT_ID,
            "client_secret": TEST_SECRET,
            "token_url": f"http://127.0.0.1:{free_port()}/token",
        }
    )
    async with token_manager(credential) as manager:
        with pytest.raises(TokenEndpointError) as caught:
            await manager.fetch()
    assert caught.value.error == "connection_error"
    assert not caught.value.rejects_client
    assert TEST_SECRET not in str(caught.value)


class _FailingSession:
    """Stands in for the ClientSession: every post fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def post(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (aiohttp.ClientConnectionError(f"refused while sending {TEST_SECRET}"), "connection_error"),
        (aiohttp.ServerTimeoutError(f"timed out sending {TEST_SECRET}"), "timeout"),
        (aiohttp.InvalidURL(f"https://id:{TEST_SECRET}@bad host/token"), "connection_error"),
    ],
)
async def test_fetch_error_keeps_its_cause_and_no_secret_reaches_a_message_or_log(
    token_server: FakeTokenServer, proxy_log: CapturedLog, error: Exception, code: str
) -> None:
    """aiohttp's error of a token request becomes a TokenEndpointError through one table: named
    by kind, its cause kept for the traceback, and neither its detail nor the logged traceback
    holds the secret its text quoted."""
    credential = make_credential(token_server)
    redactor.add_secret(TEST_SECRET)
    session = cast(aiohttp.ClientSession, _FailingSession(error))
    with pytest.raises(TokenEndpointError) as caught:
        await request_token(session, credential, request_timeout=1.0)
    assert caught.value.error == code
    assert caught.value.__cause__ is error
    assert TEST_SECRET not in f"{caught.value} {caught.value!r} {caught.value.detail}"
    try:
        raise caught.value
    except TokenEndpointError:
        get_logger("proxy.credentials").exception("token request failed")
    logged = proxy_log.text()
    assert type(error).__name__ in logged  # the cause is in the traceback ...
    assert TEST_SECRET not in logged  # ... with the secret it quoted redacted


async def test_fetch_times_out_as_token_endpoint_error(token_server: FakeTokenServer) -> None:
    """A token endpoint that does not answer within request_timeout raises TokenEndpointError."""
    token_server.release = asyncio.Event()
    try:
        async with token_manager(make_credential(token_server), request_timeout=0.2) as manager:
            with pytest.raises(TokenEndpointError) as caught:
                await manager.fetch()
    finally:
        token_server.release.set()
    assert caught.value.error == "timeout"


# --- 3. token lifetime ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [(86399.0, 30.0), (3600.0, 30.0), (300.0, 30.0), (299.0, 29.9), (100.0, 10.0), (4.0, 0.4)],
)
def test_token_usable_window_keeps_safety_margin(lifetime: float, margin: float) -> None:
    """A token is usable until min(30 s, 10 % of lifetime) before its expiry, never after."""
    token = Token(value="t", obtained_at=1000.0, lifetime=lifetime)
    end = 1000.0 + lifetime - margin
    assert token.expires_at == pytest.approx(1000.0 + lifetime)
    assert token.usable_until == pytest.approx(end)
    assert token.usable(1000.0)
    assert token.usable(end - 0.01)
    assert not token.usable(end + 1e-6)
    assert not token.usable(1000.0 + lifetime)
    assert not token.usable(1000.0 + lifetime + 1)


@pytest.mark.parametrize("lifetime", [86399.0, 3600.0, 100.0, 4.0])
def test_token_refresh_at_80_percent(lifetime: float) -> None:
    """A token's refresh is due at 80 % of its lifetime, while it is still usable."""
    token = Token(value="t", obtained_at=500.0, lifetime=lifetime)
    assert token.refresh_at == pytest.approx(500.0 + 0.8 * lifetime)
    assert token.usable(token.refresh_at)


def test_token_repr_hides_value() -> None:
    """The token value never appears in a Token's repr."""
    token = Token(value="very-secret-token-value", obtained_at=0.0, lifetime=60.0)
    assert "very-secret-token-value" not in repr(token)


# --- 4. backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 32.0),
        (7, 60.0),
        (8, 60.0),
        (50, 60.0),
    ],
)
def test_backoff_delay_bounds(attempt: int, ceiling: float) -> None:
    """Full jitter: the delay spans [0, min(60, 2**(attempt-1))] exactly."""
    assert backoff_delay(attempt, rng=lambda: 1.0) == pytest.approx(ceiling)
    assert backoff_delay(attempt, rng=lambda: 0.0) == 0.0
    assert backoff_delay(attempt, rng=lambda: 0.5) == pytest.approx(ceiling / 2)


@pytest.mark.parametrize("attempt", [1023, 1024, 1025, 5000, 100_000])
def test_backoff_delay_stays_capped_after_many_failures(attempt: int) -> None:
    """However many attempts have failed in a row, the delay stays capped at 60 s (no overflow)."""
    assert backoff_delay(attempt, rng=lambda: 1.0) == pytest.approx(60.0)


def test_backoff_delay_default_rng_jitters_within_bounds() -> None:
    """With the default rng the delays are spread over [0, ceiling], not a fixed value."""
    delays = [backoff_delay(4) for _ in range(300)]
    assert all(0.0 <= delay <= 8.0 for delay in delays)
    assert max(delays) - min(delays) > 2.0


# --- the manager's lifecycle ----------------------------------------------------------------


async def test_manager_fetches_eagerly_and_shares_one_token(token_server: FakeTokenServer) -> None:
    """Once started, the manager fetches one token and hands the same one to every caller."""
    async with token_manager(make_credential(token_server), start=True) as manager:
        await wait_for(lambda: manager.ready)
        tokens = await asyncio.gather(*(manager.token() for _ in range(50)))
    assert {token.value for token in tokens} == {token_server.issued[0]}
    assert len(token_server.requests) == 1


async def test_manager_single_flight_while_first_token_pending(
    token_server: FakeTokenServer,
) -> None:
    """Many callers waiting for the first token cause a single token request."""
    token_server.release = asyncio.Event()
    async with token_manager(make_credential(token_server), start=True) as manager:
        waiters = [asyncio.create_task(manager.token()) for _ in range(100)]
        try:
            await wait_for(lambda: len(token_server.requests) >= 1)
            assert not any(waiter.done() for waiter in waiters)
        finally:
            token_server.release.set()
        tokens = await asyncio.gather(*waiters)
    assert {token.value for token in tokens} == {token_server.issued[0]}
    assert len(token_server.requests) == 1


async def test_manager_refreshes_at_80_percent(token_server: FakeTokenServer) -> None:
    """The background refresh starts once 80 % of the token's lifetime has passed (on an
    injected clock, which the test moves past that point)."""
    token_server.expires_in = 2
    now = FakeTime()
    async with token_manager(
        make_credential(token_server), start=True, clock=now, wall=now, sleep=now.sleep
    ) as manager:
        first = await manager.token()
        now.advance(1.6 + 1e-6)
        await wait_for(lambda: manager.usable_token() not in (None, first), timeout=5)
        second = await manager.token()
    assert second.value == token_server.issued[1]
    gap = second.obtained_at - first.obtained_at
    assert 1.6 - 0.01 <= gap < 1.6 + 0.3
    assert second.obtained_at < first.usable_until


async def test_manager_waits_then_raises_token_unavailable(token_server: FakeTokenServer) -> None:
    """With no token obtainable, token() waits wait_timeout and raises TokenUnavailable."""
    token_server.release = asyncio.Event()
    try:
        async with token_manager(
            make_credential(token_server), start=True, wait_timeout=0.3
        ) as manager:
            started = time.monotonic()
            with pytest.raises(TokenUnavailable) as caught:
                await manager.token()
            elapsed = time.monotonic() - started
            assert not manager.ready
    finally:
        token_server.release.set()
    assert 0.3 - 0.01 <= elapsed < 2.0
    assert caught.value.retry_after >= 1
    assert caught.value.status == 503


async def test_manager_recovers_after_a_failed_fetch(token_server: FakeTokenServer) -> None:
    """A failed token request is retried, and a waiting caller gets the next token."""
    token_server.script.append(web.Response(status=503, text="busy", content_type="text/html"))
    async with token_manager(make_credential(token_server), start=True) as manager:
        token = await manager.token()
        state = manager.state()
    assert token.value == token_server.issued[0]
    assert len(token_server.requests) == 2
    assert state["ready"] is True
    assert state["consecutive_failures"] == 0
    assert state["last_error"] is None


async def test_manager_rejected_client_fails_fast(token_server: FakeTokenServer) -> None:
    """invalid_client makes token() raise ClientRejected at once, and state() names the error."""
    token_server.script.append(
        web.json_response(
            {"error": "invalid_client", "error_description": "Client authentication failed"},
            status=401,
        )
    )
    async with token_manager(
        make_credential(token_server), start=True, wait_timeout=10.0, rng=lambda: 0.5
    ) as manager:
        started = time.monotonic()
        with pytest.raises(ClientRejected) as caught:
            await manager.token()
        elapsed = time.monotonic() - started
        state = manager.state()
        # A second caller, after the failure is known, is refused without waiting.
        started = time.monotonic()
        with pytest.raises(ClientRejected):
            await manager.token()
        again = time.monotonic() - started
    assert elapsed < 2.0
    assert again < 0.1
    assert "rejected the client credentials" in caught.value.detail
    assert 'invalid_client ("Client authentication failed")' in caught.value.detail
    assert caught.value.retry_after >= 1
    assert state["last_error"] == "invalid_client"
    assert state["last_error_description"] == "Client authentication failed"
    assert state["ready"] is False
    assert state["consecutive_failures"] == 1
    assert TEST_SECRET not in json.dumps(state)
    assert TEST_SECRET not in str(caught.value)


PATH = "http://api.test/profile/user/wow"
OTHER = "http://api.test/data/wow/realm/index"


async def test_manager_invalidate_drops_only_the_current_token(
    token_server: FakeTokenServer,
) -> None:
    """invalidate(current) drops it and fetches one new token; a stale one is ignored."""
    async with token_manager(make_credential(token_server), start=True) as manager:
        first = await manager.token()
        assert manager.invalidate(first, path=PATH, replayable=True)
        assert not manager.ready
        assert manager.invalidate(first, path=PATH, replayable=True)
        second = await manager.token()
        assert second.value == token_server.issued[1]
        assert manager.invalidate(first, path=PATH, replayable=True)  # stale: already replaced
        assert manager.ready
        assert (await manager.token()) is second
    assert len(token_server.requests) == 2


async def test_manager_drops_a_revoked_token_however_soon_after_the_last(
    token_server: FakeTokenServer,
) -> None:
    """A 401 to the current token drops it even a moment after the previous drop, on the same
    path, once the replay with the new token succeeded: each revocation costs one fetch, and no
    time-based cooldown passes it to the client."""
    async with token_manager(make_credential(token_server), start=True) as manager:
        for round_ in range(1, 4):
            token = await manager.token()
            assert manager.invalidate(token, path=PATH, replayable=True)
            assert not manager.ready
            assert (await manager.token()).value == token_server.issued[round_]
            manager.replayed(PATH, rejected=False)
    assert len(token_server.requests) == 4


async def test_manager_spares_the_token_at_a_path_that_refused_a_fresh_one(
    token_server: FakeTokenServer,
) -> None:
    """Once a replay with a fresh token was rejected at a path, that path's 401s drop no token
    and get no replay, for 10 s (injected clock); other paths are not affected."""
    now = [1000.0]
    async with token_manager(
        make_credential(token_server), start=True, clock=lambda: now[0], wall=lambda: now[0]
    ) as manager:
        first = await manager.token()
        assert manager.invalidate(first, path=PATH, replayable=True)
        second = await manager.token()
        manager.replayed(PATH, rejected=True)
        for _ in range(5):
            assert not manager.invalidate(second, path=PATH, replayable=True)
            assert not manager.invalidate(second, path=PATH, replayable=False)
        assert (await manager.token()) is second
        now[0] += REMEMBER_FOR - 0.01
        assert not manager.invalidate(second, path=PATH, replayable=True)
        now[0] += 0.02  # forgotten: the next 401 there costs one fetch again
        assert manager.invalidate(second, path=PATH, replayable=True)
        third = await manager.token()
        manager.replayed(PATH, rejected=True)
        assert not manager.invalidate(third, path=PATH, replayable=True)
        assert manager.invalidate(third, path=OTHER, replayable=True)  # a revocation elsewhere
        assert (await manager.token()).value == token_server.issued[3]
    assert len(token_server.requests) == 4


async def test_manager_unreplayable_401s_cost_one_token_per_path(
    token_server: FakeTokenServer,
) -> None:
    """A request that cannot be replayed shows nothing about the new token: its 401 drops the
    token once, and the next such 401 at that path drops none; a replayable request there
    still drops a rejected token."""
    async with token_manager(make_credential(token_server), start=True) as manager:
        first = await manager.token()
        assert manager.invalidate(first, path=PATH, replayable=False)
        second = await manager.token()
        assert not manager.invalidate(second, path=PATH, replayable=False)
        assert (await manager.token()) is second
        assert manager.invalidate(second, path=PATH, replayable=True)
        assert (await manager.token()).value == token_server.issued[2]
    assert len(token_server.requests) == 3


async def test_manager_takes_a_401_to_the_new_token_before_the_replay_answers_as_evidence(
    token_server: FakeTokenServer,
) -> None:
    """Concurrent requests at a refusing path: once a 401 there dropped a token, a 401 there to
    the next token, arriving before the replay's answer, is the evidence already (no second
    fetch); a replay that succeeds clears that, so a revocation right after still drops."""
    async with token_manager(make_credential(token_server), start=True) as manager:
        first = await manager.token()
        assert manager.invalidate(first, path=PATH, replayable=True)
        second = await manager.token()
        assert manager.invalidate(first, path=PATH, replayable=True)  # a slower twin: replay
        assert not manager.invalidate(second, path=PATH, replayable=True)  # evidence
        manager.replayed(PATH, rejected=True)  # the replays' own 401s
        assert (await manager.token()) is second

        assert manager.invalidate(second, path=OTHER, replayable=True)  # a revocation
        third = await manager.token()
        manager.replayed(OTHER, rejected=False)  # its replay succeeded
        assert manager.invalidate(third, path=OTHER, replayable=True)  # and another, at once
        assert (await manager.token()).value == token_server.issued[3]
    assert len(token_server.requests) == 4


# --- the manager on a shared token store -------------------------------------------------------


def shared_store(credential: Credential, *, clock: Callable[[], float] = time.time) -> MemoryTokens:
    return MemoryStore(clock=clock).tokens(identity_of(credential), TEST_SECRET)


async def test_managers_sharing_a_store_fetch_one_token_for_all(
    token_server: FakeTokenServer,
) -> None:
    """Two managers on one token store (two workers, or replicas, of one credential) take its
    fetch lock in turn: one token request while both wait, and both hold its token."""
    token_server.release = asyncio.Event()
    credential = make_credential(token_server)
    store = shared_store(credential)
    async with (
        token_manager(credential, start=True, store=store) as one,
        token_manager(credential, start=True, store=store) as two,
    ):
        try:
            await wait_for(lambda: len(token_server.requests) == 1)
        finally:
            token_server.release.set()
        first, second = await one.token(), await two.token()
    assert first.value == second.value == token_server.issued[0]
    assert len(token_server.requests) == 1


async def test_a_failure_shared_in_the_store_holds_back_the_next_request_until_its_retry(
    token_server: FakeTokenServer,
) -> None:
    """A failure another process recorded in the store is this manager's too: it shows in
    /-/ready with its count, and no token request is made before its retry time (injected
    clock), then one is."""
    now = FakeTime()
    credential = make_credential(token_server)
    store = shared_store(credential, clock=now)
    await store.record_failure(
        FetchFailure(failures=3, error="temporarily_unavailable", retry_at=now.now + 30)
    )
    async with token_manager(
        credential, start=True, store=store, clock=now, wall=now, sleep=now.sleep
    ) as manager:
        await wait_for(lambda: manager.state()["last_error"] == "temporarily_unavailable")
        state = manager.state()
        assert (state["consecutive_failures"], state["next_retry_in"]) == (3, 30.0)
        assert token_server.requests == []
        now.advance(30)
        await wait_for(lambda: manager.ready)
        assert manager.state()["last_error"] is None
    assert len(token_server.requests) == 1


ROTATED = "R0tated-Store-S3cret-Value-3e8d"


async def test_managers_sharing_a_store_try_a_new_secret_at_once_and_once_for_all(
    token_server: FakeTokenServer,
) -> None:
    """Two managers on one store (two workers) whose secret was refused, which would wait
    30 s or more, are given a new one (a reload tells each): one token request carries it at
    once, and both hold its token."""
    token_server.script.append(web.json_response({"error": "invalid_client"}, status=401))
    credential = make_credential(token_server)
    store = shared_store(credential)
    async with (
        token_manager(credential, start=True, store=store, rng=lambda: 0.5) as one,
        token_manager(credential, start=True, store=store, rng=lambda: 0.5) as two,
    ):
        await wait_for(lambda: one.status().rejected and two.status().rejected)
        assert one.state()["next_retry_in"] >= 30
        rotated = credential.model_copy(update={"client_secret": SecretStr(ROTATED)})
        for manager in (one, two):
            manager.use(rotated, request_timeout=5.0, wait_timeout=5.0)
        await wait_for(lambda: one.ready and two.ready)
        assert (await one.token()).value == (await two.token()).value
    assert len(token_server.requests) == 2
    assert token_server.requests[-1].basic_credentials == (TEST_CLIENT_ID, ROTATED)


async def test_a_new_secret_ends_a_backoff_and_an_unchanged_one_does_not(
    token_server: FakeTokenServer,
) -> None:
    """A failure that is not a refusal (the store holds it with its retry time) also ends with
    a new secret; the same secret given again (a reload that left it) waits for the retry."""
    credential = make_credential(token_server)
    store = shared_store(credential)
    await store.record_failure(
        FetchFailure(failures=6, error="temporarily_unavailable", retry_at=time.time() + 30)
    )
    async with token_manager(credential, start=True, store=store) as manager:
        await wait_for(lambda: manager.state()["last_error"] == "temporarily_unavailable")
        manager.use(credential, request_timeout=5.0, wait_timeout=5.0)
        await asyncio.sleep(0.1)
        assert token_server.requests == []
        rotated = credential.model_copy(update={"client_secret": SecretStr(ROTATED)})
        manager.use(rotated, request_timeout=5.0, wait_timeout=5.0)
        await wait_for(lambda: manager.ready)
    assert len(token_server.requests) == 1
    assert token_server.requests[0].basic_credentials == (TEST_CLIENT_ID, ROTATED)


async def test_a_manager_takes_a_newer_token_from_its_store_and_forgets_one_dropped_there(
    token_server: FakeTokenServer,
) -> None:
    """A token another process published replaces this manager's at once; when another drops
    it (upstream rejected it there), this manager stops using it and fetches the next."""
    credential = make_credential(token_server)
    store = shared_store(credential)
    async with token_manager(credential, start=True, store=store) as manager:
        await manager.token()
        value = "token-another-replica-fetched"
        LEAKS.tokens.add(value)
        now = time.time()
        newer = await store.publish(value=value, obtained_at=now, expires_at=now + 3600, scope=None)

        def holds(value: str) -> bool:
            token = manager.usable_token()
            return token is not None and token.value == value

        await wait_for(lambda: holds(value))
        assert await store.drop(newer.version)
        await wait_for(lambda: len(token_server.issued) == 2 and holds(token_server.issued[1]))
    assert len(token_server.requests) == 2


class StallingTokens:
    """A token store that stops answering while `answering` is clear."""

    def __init__(self, inner: MemoryTokens) -> None:
        self.inner = inner
        self.paths = inner.paths
        self.answering = asyncio.Event()
        self.answering.set()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def stalled(*args: Any, **kwargs: Any) -> Any:
            await self.answering.wait()
            return await method(*args, **kwargs)

        return stalled


async def test_requests_never_wait_on_the_store_while_a_token_is_usable(
    token_server: FakeTokenServer,
) -> None:
    """With a token in memory, token() and the 401 rule answer at once while the store
    answers nothing at all."""
    credential = make_credential(token_server)
    stalling = StallingTokens(shared_store(credential))
    async with token_manager(credential, start=True, store=cast(TokenStore, stalling)) as manager:
        first = await manager.token()
        stalling.answering.clear()
        async with asyncio.timeout(1):
            tokens = [await manager.token() for _ in range(100)]
        assert all(token is first for token in tokens)
        manager.replayed(PATH, rejected=True)
        assert not manager.invalidate(first, path=PATH, replayable=True)
        assert manager.usable_token() is first
        stalling.answering.set()


def test_refusing_paths_is_a_bounded_lru_that_forgets() -> None:
    """The memory holds at most `limit` paths (the oldest go first), forgets each after 10 s,
    never extends a refusal it knows, and tells of each new refusal once."""
    now = [0.0]
    told: list[str] = []
    paths = RefusingPaths(clock=lambda: now[0], limit=3, on_refused=told.append)
    for index in range(10_000):
        paths.replayed(f"/user/{index}", rejected=True)
    assert len(paths) == 3
    assert len(told) == 10_000
    assert [path for path, _ in paths.items()] == ["/user/9997", "/user/9998", "/user/9999"]
    assert paths.get("/user/0") is None
    assert paths.spares("/user/9999", obtained_at=1.0, replayable=True)

    now[0] = 5.0
    paths.replayed("/user/9999", rejected=True)
    assert paths.get("/user/9999") == Refusal(REMEMBER_FOR, Evidence.REFUSED)  # not extended
    assert len(told) == 10_000
    paths.dropped("/upload", obtained_at=2.0, replayable=False)
    assert paths.spares("/upload", obtained_at=3.0, replayable=False)
    assert not paths.spares("/upload", obtained_at=3.0, replayable=True)
    paths.dropped("/upload", obtained_at=3.0, replayable=True)
    assert not paths.spares("/upload", obtained_at=3.0, replayable=True)  # the dropped token
    assert paths.spares("/upload", obtained_at=4.0, replayable=True)  # a newer one: evidence
    assert told[-1] == "/upload"

    now[0] = REMEMBER_FOR
    assert paths.get("/user/9999") is None
    assert not paths.spares("/user/9999", obtained_at=9.0, replayable=False)
    assert [path for path, _ in paths.items()] == ["/upload"]
    now[0] = 5.0 + REMEMBER_FOR
    assert not paths.spares("/upload", obtained_at=9.0, replayable=True)
    assert paths.items() == []
    paths.replayed("/next", rejected=True)
    assert len(paths) == 1  # what had run out went when the next path was learnt
