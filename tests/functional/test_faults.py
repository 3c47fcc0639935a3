"""Faults around the proxy: a token endpoint that is down, rejecting or hanging; an upstream that
cannot be resolved, fails TLS or answers 429; clients that go away mid-request; oversized
headers; and what a graceful shutdown leaves behind."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from proxy import tokens
from proxy.app import ProxyApp
from proxy.tokens import BACKOFF_CAP
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    CapturedLog,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    ProxyProcess,
    ProxyTestServer,
    SettingsFactory,
    StartProcess,
    free_port,
    manager_of,
    problem_of,
    wait_for,
)

KIB = 1024
MIB = 1024 * 1024
BLOCK = b"\x5a" * (64 * KIB)
# Words that only appear in a log when something was left open or crashed.
UNCLEAN_SHUTDOWN_MARKERS = (
    "Traceback",
    "Unclosed client session",
    "Unclosed connector",
    "Task was destroyed",
    "Task exception was never retrieved",
    "ResourceWarning",
)


# --- helpers -------------------------------------------------------------------------------


async def fetch(client: Client, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET through the in-process proxy; return status, headers and body."""
    async with client.get(path) as response:
        return response.status, dict(response.headers), await response.read()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def host_port(url: str) -> tuple[str, int]:
    parsed = URL(url)
    assert parsed.host is not None
    assert parsed.port is not None
    return parsed.host, parsed.port


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def stop_process(proxy: ProxyProcess) -> int:
    return await asyncio.to_thread(proxy.stop, signal.SIGTERM, 20.0)


def assert_clean_log(text: str) -> None:
    """No traceback, no error line and nothing left unclosed in a proxy process's log."""
    for marker in UNCLEAN_SHUTDOWN_MARKERS:
        assert marker not in text, f"{marker!r} in the proxy log:\n{text[-3000:]}"
    for line in json_lines(text):
        assert line.get("level") not in {"error", "critical"}, line
        assert "exception" not in line, line


class SwitchableTokenEndpoint:
    """The fake token server's handler behind a listener that can go away (connection refused,
    open connections dropped) and come back on the same port."""

    def __init__(self, fake: FakeTokenServer) -> None:
        self._fake = fake
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/token"
        self._server: TestServer | None = None

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._fake.handle)
        server = TestServer(app, host="127.0.0.1", port=self.port)
        await server.start_server()
        self._server = server

    async def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()


@dataclass
class HangingTokenEndpoint:
    """A token endpoint whose first `hang_first` requests never answer; it records how many
    requests are open at once and how long each hung one stayed open."""

    hang_first: int
    arrivals: list[float] = field(default_factory=list)
    held_for: list[float] = field(default_factory=list)
    open_now: int = 0
    peak: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        arrived = time.monotonic()
        self.arrivals.append(arrived)
        number = len(self.arrivals)
        # The close of a request the proxy just abandoned may still be on its way; give it a
        # moment so that only requests the proxy really keeps open are counted together.
        await asyncio.sleep(0.05)
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        try:
            if number <= self.hang_first:
                try:
                    async with asyncio.timeout(30):
                        await self.release.wait()
                finally:
                    # Runs when the server cancels this handler: the proxy closed the request.
                    self.held_for.append(time.monotonic() - arrived)
            return web.json_response(
                {"access_token": f"hung-endpoint-token-{number}", "token_type": "bearer"}
            )
        finally:
            self.open_now -= 1


@dataclass
class TransferWatch:
    """What an upstream handler saw of one streamed exchange."""

    started: int = 0
    completed: int = 0
    received: int = 0
    closed_at: list[float] = field(default_factory=list)
    first_started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def closed(self) -> int:
        return len(self.closed_at)


def endless_download(
    watch: TransferWatch, total: int = 100 * MIB
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler sending `total` bytes, recording when its connection goes away."""

    async def handler(request: web.Request) -> web.StreamResponse:
        watch.started += 1
        watch.first_started.set()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        try:
            for _ in range(total // len(BLOCK)):
                await response.write(BLOCK)
            await response.write_eof()
        except ConnectionError:
            watch.closed_at.append(time.monotonic())
            return response
        except asyncio.CancelledError:
            watch.closed_at.append(time.monotonic())
            raise
        watch.completed += 1
        return response

    return handler


def upload_sink(watch: TransferWatch) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler reading a request body, recording when its connection goes away."""

    async def handler(request: web.Request) -> web.StreamResponse:
        watch.started += 1
        try:
            async for chunk in request.content.iter_chunked(64 * KIB):
                watch.received += len(chunk)
                watch.first_started.set()
        except (ConnectionError, aiohttp.ClientPayloadError):
            watch.closed_at.append(time.monotonic())
            return web.Response(status=499)
        except asyncio.CancelledError:
            watch.closed_at.append(time.monotonic())
            raise
        if watch.received < (request.content_length or 0):
            watch.closed_at.append(time.monotonic())  # the body ended early: connection gone
        else:
            watch.completed += 1
        return web.json_response({"length": watch.received})

    return handler


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = host_port(url)
    return await asyncio.open_connection(host, port)


async def close_raw(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def aborted_download(url: str, path: str, *, read: int = 256 * KIB) -> None:
    """GET a large body through the proxy, read a little of it, then hang up."""
    reader, writer = await open_raw(url)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            await reader.readexactly(read)
    finally:
        await close_raw(writer)


# --- 1. token endpoint down while the token is still valid ---------------------------------


async def test_refresh_failures_while_token_valid_are_invisible_and_backed_off(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    proxy_log: CapturedLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While refreshes fail and the token is still usable, clients get 200 without delay, each
    failed attempt logs one warning naming the error, and retries back off with full jitter."""
    # A 20 s token is usable for 18 s; refreshing it at 10 % instead of 80 % of its life lets
    # the refreshes start failing after 2 s rather than 16 s, with the token still good.
    monkeypatch.setattr(tokens, "REFRESH_FRACTION", 0.1)
    token_server.expires_in = 20
    client = await start_proxy()
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    token_server.script.extend(
        web.Response(status=503, text="<html>Service Unavailable</html>", content_type="text/html")
        for _ in range(500)
    )
    arrivals: list[float] = []
    watching = True

    async def watch_token_requests() -> None:
        while watching:
            arrivals.extend(time.monotonic() for _ in token_server.requests[1 + len(arrivals) :])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_token_requests())
    statuses: list[int] = []
    latencies: list[float] = []
    try:
        await wait_for(lambda: len(arrivals) >= 1, timeout=5)  # the first refresh failed
        window_ends = arrivals[0] + 3.0

        async def worker() -> None:
            for _ in range(100_000):
                if time.monotonic() >= window_ends:
                    return
                started = time.monotonic()
                status, _, _ = await fetch(client, "/tick")
                latencies.append(time.monotonic() - started)
                statuses.append(status)

        await asyncio.gather(*(worker() for _ in range(3)))
        async with client.get("/-/ready") as ready:
            assert ready.status == 200
    finally:
        watching = False
        await watcher
    failed = len(token_server.requests) - 1
    assert statuses
    assert set(statuses) == {200}
    assert max(latencies) < 0.25, f"slowest request took {max(latencies):.3f} s"
    assert len(token_server.issued) == 1
    # Full jitter from 1 s doubling: in 3 s a handful of attempts, never a tight loop ...
    assert 2 <= failed <= 8, f"{failed} token requests in ~3 s of failures"
    # ... and never slower than the backoff ceiling: attempt k+1 comes within 2**(k-1) s.
    for k, (before, after) in enumerate(itertools.pairwise(arrivals), start=1):
        ceiling = min(BACKOFF_CAP, 2.0 ** (k - 1))
        assert after - before <= ceiling + 0.25, f"retry {k + 1} came {after - before:.2f} s late"

    def warnings() -> list[dict[str, Any]]:
        return proxy_log.lines(min_level="warning")

    await wait_for(lambda: len(warnings()) >= failed, timeout=3)
    found = warnings()
    assert len(found) <= len(token_server.requests) - 1, "more than one warning per attempt"
    for event in found:
        line = json.dumps(event)
        assert event["logger"] == "proxy.credentials", line
        assert event["level"] == "warning", line
        assert "exception" not in event, line
        assert "503" in line, f"the warning does not name the error: {line}"
        assert event.get("credential") == "default"


# --- 2. token expired and the endpoint down --------------------------------------------------


async def test_expired_token_and_endpoint_down_503_then_recovers_without_restart(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """With the token expired and the token endpoint refusing connections, requests wait at most
    token_wait_timeout then get 503 with Retry-After, /-/ready is 503, and the proxy recovers by
    its next scheduled retry once the endpoint is back."""
    endpoint = SwitchableTokenEndpoint(token_server)
    await endpoint.up()
    try:
        token_server.expires_in = 2  # refreshed at 1.6 s, unusable from 1.8 s
        wait_timeout = 0.5
        client = await start_proxy(token_url=endpoint.url, token_wait_timeout=wait_timeout)
        await wait_for(lambda: manager_of(client).ready, timeout=5)
        status, _, _ = await fetch(client, "/before")
        assert status == 200
        await endpoint.down()
        await wait_for(lambda: not manager_of(client).ready, timeout=5)

        started = time.monotonic()
        status, headers, body = await fetch(client, "/during")
        elapsed = time.monotonic() - started
        problem = problem_of(503, headers.get("Content-Type"), body)
        assert elapsed < wait_timeout + 0.5, f"the request waited {elapsed:.2f} s"
        assert int(headers["Retry-After"]) >= 1
        assert token_server.issued[0] not in json.dumps(problem)
        assert "/during" not in [request.raw_path for request in upstream.requests]

        status, headers, body = await fetch(client, "/-/ready")
        state = problem_of(503, headers.get("Content-Type"), body)["credentials"]["default"]
        assert state["ready"] is False
        assert state["last_error"] == "connection_error"
        assert state["consecutive_failures"] >= 1

        await endpoint.up()
        status, headers, body = await fetch(client, "/-/ready")
        assert status == 503
        next_retry_in = json.loads(body)["credentials"]["default"]["next_retry_in"]
        assert isinstance(next_retry_in, int | float)
        await wait_for(lambda: manager_of(client).ready, timeout=next_retry_in + 1.0)
        status, _, _ = await fetch(client, "/-/ready")
        assert status == 200
        status, _, _ = await fetch(client, "/after")
        assert status == 200
        assert len(token_server.issued) == 2
        after = [r for r in upstream.requests if r.raw_path == "/after"]
        assert [r.header("Authorization") for r in after] == [f"Bearer {token_server.issued[1]}"]
    finally:
        await endpoint.down()


# --- 3. client credentials rejected ----------------------------------------------------------


async def test_rejected_client_logs_error_without_secret_and_retries_slowly(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    proxy_log: CapturedLog,
) -> None:
    """invalid_client is logged once at error level naming the credential but never the secret,
    requests get 503 saying the credentials were rejected, and the next retry is 30-60 s away."""
    token_server.script.append(
        web.json_response(
            {"error": "invalid_client", "error_description": f"unknown client {TEST_SECRET}"},
            status=401,
        )
    )
    client = await start_proxy()

    def errors() -> list[dict[str, Any]]:
        return proxy_log.lines(min_level="error")

    await wait_for(lambda: bool(errors()), timeout=5)
    [event] = errors()
    assert event["logger"] == "proxy.credentials"
    assert event["level"] == "error"
    assert event.get("credential") == "default"
    assert "invalid_client" in json.dumps(event)
    everything = proxy_log.text()
    assert TEST_SECRET not in everything
    basic = base64.b64encode(f"{TEST_CLIENT_ID}:{TEST_SECRET}".encode()).decode()
    assert basic not in everything

    status, headers, body = await fetch(client, "/data")
    problem = problem_of(503, headers.get("Content-Type"), body)
    assert "rejected the client credentials" in problem["detail"]
    assert 29 <= int(headers["Retry-After"]) <= 60
    assert upstream.requests == []

    status, headers, body = await fetch(client, "/-/ready")
    assert status == 503
    state = problem_of(503, headers.get("Content-Type"), body)["credentials"]["default"]
    assert state["last_error"] == "invalid_client"
    assert 29.0 <= state["next_retry_in"] <= 60.0, state
    assert len(token_server.requests) == 1
    assert len(errors()) == 1


# --- 4. a token endpoint that hangs ----------------------------------------------------------


async def test_hung_token_requests_time_out_are_retried_and_never_pile_up(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    """With token_timeout=0.5 a hung token request is abandoned after ~0.5 s and retried, and
    however many clients wait, at most one token request is open at any time."""
    endpoint = HangingTokenEndpoint(hang_first=2)
    app = web.Application()
    app.router.add_post("/token", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = await start_proxy(
            token_url=str(server.make_url("/token")), token_timeout=0.5, token_wait_timeout=10
        )
        await wait_for(lambda: len(endpoint.arrivals) >= 1, timeout=5)
        results = await asyncio.gather(*(fetch(client, f"/wait/{i}") for i in range(20)))
        assert [status for status, _, _ in results] == [200] * 20
        assert len(endpoint.arrivals) == 3
        assert endpoint.peak == 1, f"{endpoint.peak} token requests were open at once"
        assert len(endpoint.held_for) == 2
        for held in endpoint.held_for:
            assert 0.3 <= held <= 1.0, f"a hung token request stayed open {held:.2f} s"
        for before, after in itertools.pairwise(endpoint.arrivals):
            assert after - before >= 0.45, "a retry started before the hung request timed out"
        assert {r.header("Authorization") for r in upstream.requests} == {
            "Bearer hung-endpoint-token-3"
        }
    finally:
        endpoint.release.set()
        await server.close()


# --- 5. upstream failures --------------------------------------------------------------------


async def test_unresolvable_upstream_is_a_502_problem(
    start_proxy: ProxyFactory, token_server: FakeTokenServer
) -> None:
    """An upstream host whose name does not resolve gets a 502 problem+json, within
    connect_timeout, carrying no token."""
    client = await start_proxy(upstream="https://nonexistent.invalid", connect_timeout=2)
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    started = time.monotonic()
    status, headers, body = await fetch(client, "/x")
    assert time.monotonic() - started < 3.0
    assert status == 502
    problem_of(502, headers.get("Content-Type"), body)
    assert token_server.issued[0] not in body.decode()


async def test_upstream_dns_that_never_answers_is_bounded_by_connect_timeout(
    start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS lookup of the upstream host that never answers ends within connect_timeout in a
    502 or 504 problem+json, instead of holding the request for as long as the resolver likes."""
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[str] = []
    never = asyncio.Event()

    async def silent_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "dns-never-answers.invalid":
            lookups.append(host)
            await never.wait()  # a resolver whose server drops every query
        return await real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", silent_dns)
    client = await start_proxy(upstream="https://dns-never-answers.invalid", connect_timeout=0.5)
    await wait_for(lambda: manager_of(client).ready, timeout=5)
    started = time.monotonic()
    try:
        async with asyncio.timeout(3):
            status, headers, body = await fetch(client, "/x")
    except TimeoutError:
        raise AssertionError("no answer 3 s after a request with connect_timeout=0.5") from None
    finally:
        never.set()
    assert lookups, "the upstream host was not resolved through the event loop"
    assert time.monotonic() - started < 1.5
    assert status in {502, 504}
    problem_of(status, headers.get("Content-Type"), body)


@pytest.fixture(scope="module")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 that no trust store knows."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@contextlib.asynccontextmanager
async def tls_upstream(cert: Path, key: Path) -> AsyncIterator[FakeUpstream]:
    """A working HTTPS API on 127.0.0.1 with a self-signed certificate."""
    fake = FakeUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    fake.url = str(server.make_url("/")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()


async def test_untrusted_tls_certificate_is_a_502_and_gets_no_token(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    self_signed_cert: tuple[Path, Path],
) -> None:
    """An https upstream whose certificate cannot be verified gets a 502 problem+json, and the
    request (with its token) never reaches it."""
    async with tls_upstream(*self_signed_cert) as insecure:
        assert insecure.url.startswith("https://127.0.0.1:")
        client = await start_proxy(upstream=insecure.url, connect_timeout=2)
        status, headers, body = await fetch(client, "/x")
        assert status == 502
        problem_of(502, headers.get("Content-Type"), body)
        assert insecure.requests == []
        assert token_server.issued[0] not in body.decode()


async def test_plain_http_server_behind_https_url_is_a_502(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    """An https upstream URL whose port speaks plain HTTP (a failed TLS handshake) gets 502."""
    client = await start_proxy(upstream=upstream.url.replace("http://", "https://"))
    started = time.monotonic()
    status, headers, body = await fetch(client, "/x")
    assert time.monotonic() - started < 5
    assert status == 502
    problem_of(502, headers.get("Content-Type"), body)
    assert upstream.requests == []


async def test_upstream_429_passes_through_with_retry_after_and_body(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A 429 from upstream reaches the client as is (status, Retry-After, body), without a retry
    and without dropping the token."""
    payload = b'{"code":429,"type":"BLZWEBAPI00000429","detail":"Too Many Requests"}'

    async def too_many(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=429,
            body=payload,
            headers={"Retry-After": "7", "Content-Type": "application/json;charset=UTF-8"},
        )

    upstream.handlers["/busy"] = too_many
    client = await start_proxy()
    status, headers, body = await fetch(client, "/busy")
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert headers["Content-Type"] == "application/json;charset=UTF-8"
    assert body == payload
    assert [r.raw_path for r in upstream.requests] == ["/busy"]
    assert len(token_server.requests) == 1


# --- 6. clients that go away -----------------------------------------------------------------


async def test_client_aborting_upload_cancels_the_upstream_request(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """A client that hangs up halfway through a streamed upload makes the proxy drop the
    upstream request promptly, and nothing in the log is a traceback or error."""
    watch = TransferWatch()
    upstream.handlers["/stream-upload"] = upload_sink(watch)
    proxy = await proxy_process({"TOKEN_PROXY_LOG_LEVEL": "info"})
    _, writer = await open_raw(proxy.url)
    try:
        head = (
            "POST /stream-upload HTTP/1.1\r\nHost: proxy.test\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {50 * MIB}\r\n\r\n"
        )
        writer.write(head.encode())
        for _ in range(32):  # 2 MiB of 50
            writer.write(BLOCK)
            await writer.drain()
        async with asyncio.timeout(10):
            await watch.first_started.wait()
    finally:
        writer.transport.abort()
        hung_up = time.monotonic()
    await wait_for(lambda: watch.closed == 1, timeout=5)
    assert watch.closed_at[0] - hung_up < 5
    assert watch.completed == 0
    assert watch.received < 50 * MIB
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/after") as response:
        assert response.status == 200
    assert await stop_process(proxy) == 0
    assert_clean_log(proxy.log_text())


async def test_client_aborting_download_cancels_the_upstream_request(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """A client that hangs up after the first bytes of a 100 MiB download makes the proxy drop
    the upstream response promptly, and nothing in the log is a traceback or error."""
    watch = TransferWatch()
    upstream.handlers["/stream-download"] = endless_download(watch)
    proxy = await proxy_process({"TOKEN_PROXY_LOG_LEVEL": "info"})
    await aborted_download(proxy.url, "/stream-download")
    hung_up = time.monotonic()
    await wait_for(lambda: watch.closed == 1, timeout=5)
    assert watch.closed_at[0] - hung_up < 5
    assert watch.completed == 0
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/after") as response:
        assert response.status == 200
    assert await stop_process(proxy) == 0
    assert_clean_log(proxy.log_text())


@pytest.mark.timeout(60)
async def test_50_aborted_downloads_leak_no_file_descriptors(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """After 50 aborted 100 MiB downloads the proxy's open file descriptors return to their
    baseline, every upstream response was dropped, and the proxy still serves."""
    watch = TransferWatch()
    upstream.handlers["/stream-download"] = endless_download(watch)
    proxy = await proxy_process({"TOKEN_PROXY_LOG_LEVEL": "info"})
    # Warm up on a connection the proxy closes, so only long-lived descriptors are counted.
    reader, writer = await open_raw(proxy.url)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(10):
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
    await close_raw(writer)  # the proxy closed its side first: read() saw the end
    baseline = fd_count(proxy.pid)

    async with asyncio.timeout(40):
        for _ in range(5):
            await asyncio.gather(
                *(aborted_download(proxy.url, "/stream-download") for _ in range(10))
            )
    await wait_for(lambda: watch.closed == 50, timeout=10)
    assert watch.started == 50
    assert watch.completed == 0
    await wait_for(lambda: fd_count(proxy.pid) <= baseline, timeout=10)
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/after") as response:
        assert response.status == 200
        assert (await response.json())["path"] == "/after"
    assert proxy.process.poll() is None


# --- 7. header limits ------------------------------------------------------------------------


async def raw_roundtrip(client: Client, data: bytes) -> bytes:
    """Send bytes to the in-process proxy and read until it closes the connection."""
    assert client.host is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        await close_raw(writer)


def request_with_header(path: str, value: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\nX-Big: {value}\r\n\r\n"
    ).encode()


@contextlib.asynccontextmanager
async def head_recorder() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream with no header limit of its own: it records each request head it gets."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1024 * KIB)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        server.close()
        await server.wait_closed()


async def test_header_over_8190_bytes_is_a_400_and_never_forwarded(
    start_proxy: ProxyFactory,
) -> None:
    """A request header over 8190 bytes gets 400 and never reaches upstream, while one just
    under the limit is forwarded intact."""
    async with head_recorder() as (url, heads):
        client = await start_proxy(upstream=url)
        await wait_for(lambda: manager_of(client).ready, timeout=5)
        response = await raw_roundtrip(client, request_with_header("/big", "b" * 8191))
        # aiohttp's parser answers a request it cannot read as HTTP/1.0.
        assert response.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), response[:200]
        assert heads == []

        under = "u" * 8000
        response = await raw_roundtrip(client, request_with_header("/fits", under))
        assert response.startswith(b"HTTP/1.1 200 "), response[:200]
        assert len(heads) == 1
        assert heads[0].startswith(b"GET /fits HTTP/1.1\r\n")
        assert f"\r\nX-Big: {under}\r\n".encode() in heads[0]


# --- 8. graceful shutdown --------------------------------------------------------------------


async def connection_refused(url: str) -> bool:
    try:
        _, writer = await open_raw(url)
    except ConnectionRefusedError:
        return True
    await close_raw(writer)
    return False


async def test_sigterm_stops_accepting_finishes_request_and_closes_everything(
    proxy_process: StartProcess, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """After SIGTERM new connections are refused while a slow request still finishes with 200,
    then the process exits 0 with nothing left unclosed or destroyed pending in its log."""
    token_server.expires_in = 3  # the refresh task is busy: it must be stopped, not abandoned
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        async with asyncio.timeout(20):
            await release.wait()
        return web.json_response({"slow": True})

    upstream.handlers["/slow"] = slow
    proxy = await proxy_process({"PYTHONDEVMODE": "1", "TOKEN_PROXY_LOG_LEVEL": "debug"})
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.get(proxy.url + "/slow"))
            async with asyncio.timeout(10):
                await arrived.wait()
            proxy.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not await connection_refused(proxy.url):
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                await asyncio.sleep(0.02)
            assert not pending.done()
            assert proxy.process.poll() is None
            release.set()
            async with asyncio.timeout(10):
                response = await pending
            assert response.status == 200
            assert await response.json() == {"slow": True}
            response.release()
    finally:
        release.set()
    code = await asyncio.to_thread(proxy.process.wait, 20)
    assert code == 0
    assert_clean_log(proxy.log_text())


async def test_app_cleanup_stops_the_refresh_task_and_closes_every_connection(
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    proxy_log: CapturedLog,
) -> None:
    """Stopping the app cancels the token refresh task and closes the token and upstream
    sessions: no task or connection it started outlives it, and no token is fetched after."""
    token_server.expires_in = 1  # a refresh every 0.8 s keeps the refresh task busy
    before = asyncio.all_tasks()
    settings = make_settings()
    client: Client = TestClient(ProxyTestServer(ProxyApp(settings)))
    await client.start_server()
    try:
        await wait_for(lambda: len(token_server.issued) >= 2, timeout=5)  # refreshed once
        status, _, _ = await fetch(client, "/warm")  # an upstream connection is pooled
        assert status == 200
    finally:
        await client.close()
    closed_at = len(token_server.requests)

    def survivors() -> list[asyncio.Task[Any]]:
        current = asyncio.current_task()
        return [
            task
            for task in asyncio.all_tasks()
            if task not in before and task is not current and not task.done()
        ]

    # Server-side tasks of the fake token server and upstream end when the proxy's pooled
    # connections to them close; the refresh task ends when it is cancelled.
    await wait_for(lambda: not survivors(), timeout=5)
    assert len(token_server.requests) == closed_at
    assert proxy_log.lines(min_level="error") == []
