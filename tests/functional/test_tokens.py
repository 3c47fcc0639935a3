"""Token behaviour of the whole proxy, in-process, against the fake token server and upstream:
single flight, background refresh, waiting for a token, 401 replay, rejected credentials."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.bodies import REPLAYABLE_BODY_LIMIT
from tests.conftest import (
    PROBLEM_JSON,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    Handler,
    ProxyFactory,
    app_of,
    manager_of,
    wait_for,
)


def in_flight(client: Client) -> float:
    value = app_of(client).metrics.registry.get_sample_value("token_proxy_in_flight_requests")
    return value or 0.0


async def fetch(client: Client, method: str, path: str, **kwargs: Any) -> tuple[int, str, bytes]:
    """Send one request through the proxy; return status, content type and body."""
    async with client.request(method, path, **kwargs) as response:
        return response.status, response.content_type, await response.read()


def rejects_token(token_server: FakeTokenServer, index: int = 0) -> Handler:
    """An upstream handler answering 401 to the token issued `index`-th, 200 to any other."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") == f"Bearer {token_server.issued[index]}":
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return web.json_response({"ok": True, "path": request.raw_path})

    return handler


def revoking(revoked: set[str]) -> Handler:
    """An upstream handler answering 401 to every token in `revoked` (as Authorization values),
    200 to any other."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") in revoked:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True, "path": request.raw_path})

    return handler


async def needs_user_token(request: web.Request) -> web.StreamResponse:
    """An upstream handler refusing every application token, as a user-token endpoint does."""
    return web.json_response({"error": "needs a user token"}, status=401)


def auth_of_requests(upstream: FakeUpstream, path: str) -> list[str | None]:
    return [
        request.header("Authorization")
        for request in upstream.requests
        if request.raw_path.partition("?")[0] == path
    ]


# --- start-up and single flight ----------------------------------------------------------------


async def test_token_fetched_eagerly_at_startup(
    start_proxy: ProxyFactory, token_server: FakeTokenServer
) -> None:
    """The proxy fetches its token at start-up, before any request, and /-/ready then says 200."""
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    assert len(token_server.requests) == 1
    status, content_type, body = await fetch(client, "GET", "/-/ready")
    assert status == 200
    assert content_type == "application/json"
    assert json.loads(body)["credentials"]["default"]["ready"] is True


async def test_300_concurrent_requests_share_one_token_request(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """300 requests arriving while the first token is being fetched cause exactly one token
    request, and all of them are forwarded with that token."""
    token_server.release = asyncio.Event()
    client = await start_proxy()
    await wait_for(lambda: len(token_server.requests) == 1, timeout=5)
    tasks = [asyncio.create_task(fetch(client, "GET", f"/item/{i}")) for i in range(300)]
    try:
        await wait_for(lambda: in_flight(client) == 300, timeout=15)
        assert not any(task.done() for task in tasks)
        assert len(token_server.requests) == 1
    finally:
        token_server.release.set()
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * 300
    assert len(token_server.requests) == 1
    assert len(upstream.requests) == 300
    assert {request.header("Authorization") for request in upstream.requests} == {
        f"Bearer {token_server.issued[0]}"
    }


# --- background refresh --------------------------------------------------------------------------


async def test_short_lived_token_refreshed_in_background(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A 4 s token is refreshed in the background: while the refresh is held at the token
    endpoint, requests go on with the current token instead of waiting for it, none fails,
    the new token takes over, and no token is used within its safety margin before expiry."""
    lifetime = 4.0
    usable_for = lifetime - min(30.0, 0.1 * lifetime)
    token_server.expires_in = lifetime
    used: list[tuple[float, str]] = []  # (monotonic time upstream saw it, Authorization)
    arrivals: list[float] = []  # monotonic time each token request was first seen
    watching = True

    async def tick(request: web.Request) -> web.StreamResponse:
        used.append((time.monotonic(), request.headers.get("Authorization", "")))
        return web.json_response({"ok": True})

    async def watch_token_requests() -> None:
        while watching:
            arrivals.extend(time.monotonic() for _ in token_server.requests[len(arrivals) :])
            await asyncio.sleep(0.005)

    upstream.handlers["/tick"] = tick
    watcher = asyncio.create_task(watch_token_requests())
    statuses: list[int] = []
    stop = asyncio.Event()
    # Every token request after the first is held until the test has seen what it waits for.
    token_server.release = release = asyncio.Event()
    release.set()
    try:
        client = await start_proxy()
        await wait_for(lambda: manager_of(client).ready, timeout=5)
        release.clear()

        async def worker() -> None:
            while not stop.is_set():
                status, _, _ = await fetch(client, "GET", "/tick")
                statuses.append(status)

        workers = [asyncio.create_task(worker()) for _ in range(3)]
        try:
            await wait_for(lambda: len(token_server.requests) == 2, timeout=10)
            first, held_from = f"Bearer {token_server.issued[0]}", len(used)

            # Three requests could have been under way when the refresh began; more than that
            # finishing with the old token means requests do not wait for the refresh.
            def served_during_refresh() -> int:
                return sum(1 for _, auth in used[held_from:] if auth == first)

            await wait_for(lambda: served_during_refresh() >= 6, timeout=5)
            release.set()
            await wait_for(lambda: len(token_server.issued) == 2, timeout=5)
            second = f"Bearer {token_server.issued[1]}"
            await wait_for(lambda: sum(1 for _, auth in used if auth == second) >= 6, timeout=5)
        finally:
            stop.set()
            release.set()
            await asyncio.gather(*workers)
    finally:
        watching = False
        await watcher
    assert statuses
    assert set(statuses) == {200}
    assert len(token_server.requests) == 2
    tokens_used = {auth.removeprefix("Bearer ") for _, auth in used}
    assert tokens_used == set(token_server.issued)
    for seen_at, auth in used:
        index = token_server.issued.index(auth.removeprefix("Bearer "))
        obtained_no_earlier_than = arrivals[index]
        assert seen_at < obtained_no_earlier_than + usable_for, (
            f"token #{index} used {seen_at - obtained_no_earlier_than:.3f} s after it was "
            f"requested; it is usable for {usable_for} s"
        )


# --- no usable token -----------------------------------------------------------------------------


async def test_no_token_waits_then_503_and_ready_follows(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """With no token obtainable a request waits token_wait_timeout then gets 503 problem+json with
    Retry-After; /-/ready is 503 meanwhile and 200 once the token endpoint works again."""
    token_server.release = asyncio.Event()
    try:
        client = await start_proxy(token_wait_timeout=0.5)
        await wait_for(lambda: len(token_server.requests) == 1, timeout=5)
        started = time.monotonic()
        async with client.get("/data/x") as response:
            elapsed = time.monotonic() - started
            assert response.status == 503
            assert response.content_type == PROBLEM_JSON
            retry_after = response.headers.get("Retry-After")
            problem = await response.json(content_type=PROBLEM_JSON)
        assert 0.5 - 0.01 <= elapsed < 3.0
        assert retry_after is not None
        assert int(retry_after) >= 1
        assert problem["status"] == 503
        assert problem["title"]
        assert problem["detail"]
        assert problem["type"]
        assert upstream.requests == []

        async with client.get("/-/ready") as ready:
            assert ready.status == 503
            assert ready.content_type == PROBLEM_JSON
            state = await ready.json(content_type=PROBLEM_JSON)
        assert state["status"] == 503
        assert state["credentials"]["default"]["ready"] is False

        # The held request now fails (a proxy's HTML error page); the retry succeeds.
        token_server.script.append(
            web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")
        )
    finally:
        token_server.release.set()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    async with client.get("/-/ready") as ready:
        assert ready.status == 200
    status, _, _ = await fetch(client, "GET", "/data/x")
    assert status == 200
    assert len(token_server.requests) == 2
    assert auth_of_requests(upstream, "/data/x") == [f"Bearer {token_server.issued[0]}"]


@pytest.mark.parametrize("status", [400, 401])
async def test_rejected_client_gets_503_quickly_and_ready_names_error(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, status: int
) -> None:
    """invalid_client from the token endpoint: requests get a quick 503 saying the credentials
    were rejected with the endpoint's error and error_description, and /-/ready is 503 naming
    both."""
    token_server.script.append(
        web.json_response(
            {"error": "invalid_client", "error_description": "Client authentication failed"},
            status=status,
        )
    )
    client = await start_proxy()
    started = time.monotonic()
    async with client.get("/data/x") as response:
        elapsed = time.monotonic() - started
        assert response.status == 503
        assert response.content_type == PROBLEM_JSON
        retry_after = response.headers.get("Retry-After")
        text = await response.text()
    problem = json.loads(text)
    assert elapsed < 2.0  # far below token_wait_timeout (10 s)
    assert "rejected the client credentials" in problem["detail"]
    assert 'invalid_client ("Client authentication failed")' in problem["detail"]
    assert problem["status"] == 503
    assert retry_after is not None
    assert int(retry_after) >= 1
    assert TEST_SECRET not in text
    assert upstream.requests == []

    # Once the rejection is known, a request is answered without waiting at all.
    started = time.monotonic()
    status, _, _ = await fetch(client, "GET", "/data/y")
    assert status == 503
    assert time.monotonic() - started < 0.5

    async with client.get("/-/ready") as ready:
        assert ready.status == 503
        assert ready.content_type == PROBLEM_JSON
        ready_text = await ready.text()
    state = json.loads(ready_text)
    assert state["credentials"]["default"]["last_error"] == "invalid_client"
    assert state["credentials"]["default"]["last_error_description"] == (
        "Client authentication failed"
    )
    assert state["credentials"]["default"]["ready"] is False
    assert TEST_SECRET not in ready_text
    assert len(token_server.requests) == 1


async def test_rejection_that_echoes_the_secret_is_reported_redacted(
    start_proxy: ProxyFactory, token_server: FakeTokenServer
) -> None:
    """A token endpoint whose error_description quotes the secret back: the 503's detail and
    /-/ready still name the error and the description, with the secret redacted."""
    token_server.script.append(
        web.json_response(
            {"error": "invalid_client", "error_description": f"unknown secret {TEST_SECRET}"},
            status=401,
        )
    )
    client = await start_proxy()
    status, _, body = await fetch(client, "GET", "/data/x")
    assert status == 503
    ready_status, _, ready_body = await fetch(client, "GET", "/-/ready")
    assert ready_status == 503
    assert TEST_SECRET not in body.decode()
    assert TEST_SECRET not in ready_body.decode()
    assert 'invalid_client ("unknown secret [redacted]")' in json.loads(body)["detail"]
    state = json.loads(ready_body)["credentials"]["default"]
    assert (state["last_error"], state["last_error_description"]) == (
        "invalid_client",
        "unknown secret [redacted]",
    )


# --- upstream 401 --------------------------------------------------------------------------------


async def test_upstream_401_replays_request_once_with_new_token(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A 401 to the current token drops it, fetches one new token and replays the bodiless
    request, which succeeds."""
    upstream.handlers["/thing"] = rejects_token(token_server)
    client = await start_proxy()
    status, _, body = await fetch(client, "GET", "/thing?x=1")
    assert status == 200
    assert json.loads(body) == {"ok": True, "path": "/thing?x=1"}
    assert len(token_server.requests) == 2
    first, second = token_server.issued
    assert auth_of_requests(upstream, "/thing") == [f"Bearer {first}", f"Bearer {second}"]
    # The new token is now the current one: the next request needs no replay.
    status, _, _ = await fetch(client, "GET", "/thing")
    assert status == 200
    assert auth_of_requests(upstream, "/thing")[-1] == f"Bearer {second}"
    assert len(token_server.requests) == 2


async def test_upstream_401_replays_buffered_body_of_1_mib(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A request whose body is exactly 1 MiB with Content-Length is replayed, body intact."""
    upstream.handlers["/upload"] = rejects_token(token_server)
    client = await start_proxy()
    payload = bytes(range(256)) * (REPLAYABLE_BODY_LIMIT // 256)
    assert len(payload) == 1024 * 1024
    status, _, _ = await fetch(
        client, "POST", "/upload", data=payload, headers={"Content-Type": "application/x-thing"}
    )
    assert status == 200
    sent = [request for request in upstream.requests if request.raw_path == "/upload"]
    assert len(sent) == 2
    assert sent[0].header("Authorization") == f"Bearer {token_server.issued[0]}"
    assert sent[1].header("Authorization") == f"Bearer {token_server.issued[1]}"
    assert sent[1].body_length == len(payload)
    assert sent[1].body == payload
    assert len(token_server.requests) == 2


def big_body(kind: str, size: int) -> io.BytesIO | AsyncIterator[bytes]:
    """A request body of `size` bytes, sent with Content-Length or chunked."""
    if kind == "content-length":
        return io.BytesIO(b"z" * size)

    async def chunks() -> AsyncIterator[bytes]:
        left = size
        while left:
            step = min(left, 256 * 1024)
            left -= step
            yield b"z" * step

    return chunks()


@pytest.mark.parametrize("kind", ["content-length", "chunked"])
async def test_upstream_401_streamed_body_over_1_mib_is_not_replayed(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, kind: str
) -> None:
    """A request whose body exceeds 1 MiB is sent once: the client gets upstream's 401, the token
    is still dropped and one new token is fetched for the next request."""
    upstream.handlers["/upload"] = rejects_token(token_server)
    client = await start_proxy()
    size = REPLAYABLE_BODY_LIMIT + 1
    status, _, body = await fetch(client, "POST", "/upload", data=big_body(kind, size))
    assert status == 401
    assert json.loads(body) == {"error": "invalid_token"}
    sent = [request for request in upstream.requests if request.raw_path == "/upload"]
    assert len(sent) == 1
    assert sent[0].body_length == size
    await wait_for(lambda: manager_of(client).ready and len(token_server.issued) == 2, timeout=5)
    status, _, _ = await fetch(client, "POST", "/upload", data=big_body(kind, size))
    assert status == 200
    assert auth_of_requests(upstream, "/upload")[-1] == f"Bearer {token_server.issued[1]}"
    assert len(token_server.requests) == 2


async def test_concurrent_401s_fetch_one_new_token(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Many requests rejected with the same token cause one token request, including 401s that
    come back after the new token is in place; every request is replayed and succeeds."""
    count = 20
    arrived: list[str] = []
    all_arrived = asyncio.Event()
    rejecting = rejects_token(token_server)
    client: Client | None = None

    def second_token_installed() -> bool:
        return client is not None and len(token_server.issued) >= 2 and manager_of(client).ready

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") == f"Bearer {token_server.issued[0]}":
            arrived.append(request.raw_path)
            position = len(arrived)
            if position == count:
                all_arrived.set()
            # Every first-token request is at upstream before any is answered ...
            async with asyncio.timeout(10):
                await all_arrived.wait()
            # ... and half of the 401s arrive only once the new token is in place.
            if position > count // 2:
                await wait_for(second_token_installed, timeout=5)
        return await rejecting(request)

    upstream.handlers["/many"] = handler
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    results = await asyncio.gather(*(fetch(client, "GET", f"/many?{i}") for i in range(count)))
    assert [status for status, _, _ in results] == [200] * count
    assert len(arrived) == count
    assert len(token_server.requests) == 2
    assert auth_of_requests(upstream, "/many").count(f"Bearer {token_server.issued[1]}") == count


async def test_upstream_401_forever_is_not_looped(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """When upstream answers 401 to every token, the request is replayed once and the client gets
    the 401; no loop of replays or token requests."""

    async def always_401(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "forbidden_forever"}, status=401)

    upstream.handlers["/never"] = always_401
    client = await start_proxy()
    status, _, body = await fetch(client, "GET", "/never")
    assert status == 401
    assert json.loads(body) == {"error": "forbidden_forever"}
    assert auth_of_requests(upstream, "/never") == [
        f"Bearer {token_server.issued[0]}",
        f"Bearer {token_server.issued[1]}",
    ]
    assert len(token_server.requests) == 2


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_two_revocations_milliseconds_apart_both_end_in_200(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, method: str
) -> None:
    """The token in use is revoked, and its replacement too the moment it is in use: each
    revocation costs one token fetch and the request (bodiless, or with a small buffered body)
    is replayed and succeeds, however soon after the previous fetch."""
    revoked: set[str] = set()
    upstream.handlers["/thing"] = revoking(revoked)
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    payload = b'{"small": "body"}' if method == "POST" else None
    for _ in range(2):
        revoked.add(f"Bearer {token_server.issued[-1]}")
        status, _, body = await fetch(client, method, "/thing", data=payload)
        assert status == 200, body
    first, second, third = token_server.issued
    assert len(token_server.requests) == 3
    assert auth_of_requests(upstream, "/thing") == [
        f"Bearer {first}",
        f"Bearer {second}",
        f"Bearer {second}",
        f"Bearer {third}",
    ]
    assert {request.body for request in upstream.requests} == {payload or b""}


async def test_refusing_path_between_good_requests_costs_one_token_fetch(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Twenty pairs of a request to a path that refuses every application token and a good
    request elsewhere: the refusing path costs one token fetch (its first 401, whose replay
    with the new token is rejected too), then its 401s go to the client without a fetch or a
    replay, and every good request succeeds."""
    upstream.handlers["/profile/user/wow"] = needs_user_token
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    for _ in range(20):
        status, _, body = await fetch(client, "GET", "/profile/user/wow?locale=en_US")
        assert status == 401
        assert json.loads(body) == {"error": "needs a user token"}
        status, _, _ = await fetch(client, "GET", "/data/wow/realm/index")
        assert status == 200
    assert len(token_server.requests) <= 3
    assert len(token_server.requests) == 2  # the first token, and one for the path's first 401
    assert len(auth_of_requests(upstream, "/profile/user/wow")) == 21  # one replay


async def test_a_401_to_the_new_token_before_the_replay_answers_is_evidence_too(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Requests at a refusing path that waited for the new token alongside the replay are
    answered 401 before the replay is: the path still costs one token fetch, because a 401
    there to the token fetched for a 401 there is the evidence, whichever request brings it."""
    answered: list[str] = []  # the r= of each request answered with the second token

    async def refusing(request: web.Request) -> web.StreamResponse:
        second = token_server.issued[1:2]
        if second and request.headers.get("Authorization") == f"Bearer {second[0]}":
            if request.query["r"] == "1":  # the replay waits for the other four
                await wait_for(lambda: len(answered) == 4, timeout=5)
            answered.append(request.query["r"])
        return web.json_response({"error": "needs a user token"}, status=401)

    upstream.handlers["/profile/user/wow"] = refusing
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    token_server.release = asyncio.Event()
    try:
        tasks = [asyncio.create_task(fetch(client, "GET", "/profile/user/wow?r=1"))]
        await wait_for(lambda: len(token_server.requests) == 2, timeout=5)  # held
        tasks += [
            asyncio.create_task(fetch(client, "GET", f"/profile/user/wow?r={r}"))
            for r in range(2, 6)
        ]
        await wait_for(lambda: in_flight(client) == 5, timeout=5)
    finally:
        token_server.release.set()
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [401] * 5
    assert sorted(answered[:4]) == ["2", "3", "4", "5"]
    assert answered[4:] == ["1"]
    assert len(token_server.requests) == 2
    assert len(auth_of_requests(upstream, "/profile/user/wow")) == 6  # one replay


async def test_revocation_right_after_a_refusing_path_was_learnt_still_succeeds(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Both halves of the 401 rule in one stream of traffic: a refusing path is learnt, then
    the token is revoked a moment later; the good requests are replayed with a new token and
    succeed, and the refusing path still costs no more fetches."""
    revoked: set[str] = set()
    upstream.handlers["/profile/user/wow"] = needs_user_token
    upstream.handlers["/good"] = revoking(revoked)
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    for pair in range(20):
        if pair in (1, 10):
            revoked.add(f"Bearer {token_server.issued[-1]}")
        status, _, _ = await fetch(client, "GET", "/profile/user/wow")
        assert status == 401
        status, _, _ = await fetch(client, "GET", "/good")
        assert status == 200, f"pair {pair}"
    assert len(token_server.requests) == 4  # the first, the path's 401, two revocations


async def test_path_that_rejects_every_token_does_not_churn_tokens(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A path that answers 401 to every token (a user-token endpoint, say) gets one new token
    and one replay, then its 401s pass through without fetching a token per request."""

    async def always_401(request: web.Request) -> web.Response:
        return web.json_response({"error": "needs a user token"}, status=401)

    upstream.handlers["/profile/user/wow"] = always_401
    client = await start_proxy()
    for _ in range(5):
        async with client.get("/profile/user/wow") as response:
            assert response.status == 401
    assert len(token_server.requests) == 2  # the first token, and one after the first 401
    assert len(upstream.requests) == 6  # one replay, then each request once


@pytest.mark.parametrize("kind", ["content-length", "chunked"])
async def test_refusing_path_with_unreplayable_bodies_costs_one_token_fetch(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, kind: str
) -> None:
    """Uploads over 1 MiB to a path that refuses every token cannot be replayed: the first 401
    drops the token, the next ones there drop none; a replayable request elsewhere still
    gets a fresh token when its own is rejected."""
    upstream.handlers["/upload"] = needs_user_token
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    for _ in range(5):
        status, _, _ = await fetch(
            client, "POST", "/upload", data=big_body(kind, REPLAYABLE_BODY_LIMIT + 1)
        )
        assert status == 401
    assert len(token_server.requests) == 2
    assert len(auth_of_requests(upstream, "/upload")) == 5
