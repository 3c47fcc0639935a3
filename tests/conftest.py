"""Shared fixtures: a fake OAuth token server and a fake upstream API on loopback, settings
that point at them, the proxy itself in-process or as a real subprocess, and a real
redis-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from proxy.app import ProxyApp
from proxy.config import Settings
from proxy.credentials import TokenManager
from proxy.log import configure_logging, redactor
from tests.redis_server import PASSWORD as REDIS_PASSWORD
from tests.redis_server import RedisServer, redis_binary

TEST_CLIENT_ID = "test-client-id"
TEST_SECRET = "Sup3r-S3cret-Value-Never-Logged-7f3a"


OUTSIDE_TESTS = "outside any test"


class LeakWatch:
    """Everything the suite saw the proxy produce, each piece with the test during which it
    was captured, and every token issued: no text may contain the test secret or any token.
    Each test's captures are checked as it ends (its teardown fails, naming it), and all of
    them again at the end of the session."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, str]] = []  # (test, where, text)
        self.tokens: set[str] = set()
        self.log = io.StringIO()
        self.current = OUTSIDE_TESTS
        # Where each test's lines begin in `log`, in order.
        self._log_starts: list[tuple[int, str]] = [(0, OUTSIDE_TESTS)]
        self._first_text = 0
        self.reported: set[str] = set()  # by the checks of single tests

    def begin(self, test: str) -> None:
        """Attribute what is captured from now on to `test` (a node id)."""
        self.current = test
        self._log_starts.append((self.log.tell(), test))
        self._first_text = len(self.texts)

    def end(self) -> None:
        self.begin(OUTSIDE_TESTS)

    def add(self, where: str, text: str) -> None:
        self.texts.append((self.current, where, text))

    def _needles(self) -> dict[str, str]:
        basic = base64.b64encode(f"{TEST_CLIENT_ID}:{TEST_SECRET}".encode()).decode()
        needles = {
            "the test secret": TEST_SECRET,
            "the Basic credentials": basic,
            "the Redis password": REDIS_PASSWORD,
        }
        needles.update({f"token {token[:6]}…": token for token in self.tokens})
        return needles

    def _pieces(self, *, current_only: bool) -> list[tuple[str, str, str]]:
        texts = self.texts[self._first_text :] if current_only else self.texts
        log = self.log.getvalue()
        starts = self._log_starts[-1:] if current_only else self._log_starts
        ends = [start for start, _ in starts[1:]] + [len(log)]
        in_log = [
            (test, "the in-process logs", log[start:end])
            for (start, test), end in zip(starts, ends, strict=True)
        ]
        return [*texts, *in_log]

    def leaks(self, *, current_only: bool = False) -> list[str]:
        """What leaked and where, each with the test during which it was captured; only the
        current test's captures when `current_only`."""
        needles = self._needles()
        return [
            f"{name} in {where}, during {test}"
            for test, where, text in self._pieces(current_only=current_only)
            for name, needle in needles.items()
            if needle in text
        ]


LEAKS = LeakWatch()


class _Tee(io.StringIO):
    """The suite's log stream: to stderr, as usual, into LeakWatch, and into `copy`."""

    def __init__(self, copy: io.StringIO | None = None) -> None:
        super().__init__()
        self.copy = copy

    def write(self, text: str) -> int:
        LEAKS.log.write(text)
        if self.copy is not None:
            self.copy.write(text)
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def configure_test_logging(copy: io.StringIO | None = None) -> None:
    """Debug-level JSON logs, tracebacks included, watched for leaks (and copied to `copy`)."""
    # Unbuffered: tests read the log right after the line that they wait for was logged.
    configure_logging(level="debug", fmt="json", stream=_Tee(copy), cache=False, buffered=False)


_LEVEL_RANK = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class CapturedLog:
    """The JSON lines the in-process proxy logged during a test, as it writes them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self, *, min_level: str = "debug", prefix: str = "proxy") -> list[dict[str, Any]]:
        found = []
        for line in self.text().splitlines():
            event: dict[str, Any] = json.loads(line)
            if not str(event.get("logger") or "").startswith(prefix):
                continue
            if _LEVEL_RANK.get(str(event.get("level")), 0) >= _LEVEL_RANK[min_level]:
                found.append(event)
        return found


@pytest.fixture
def proxy_log() -> Iterator[CapturedLog]:
    """Capture the log lines of this test (rendered and redacted, as the proxy writes them)."""
    captured = CapturedLog()
    configure_test_logging(captured.stream)
    yield captured
    configure_test_logging()


@dataclass
class TokenRequest:
    """One request the fake token server received."""

    headers: dict[str, str]
    form: dict[str, str]
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def basic_credentials(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return unquote_plus(user), unquote_plus(password)


@dataclass
class FakeTokenServer:
    """An OAuth 2.0 token endpoint: issues unique tokens, or the failures a test scripts."""

    expires_in: float | None = 3600
    delay: float = 0.0
    scope: str | None = None
    # Each scripted answer is used once, in order, before normal tokens resume.
    script: list[web.Response] = field(default_factory=list)
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    release: asyncio.Event | None = None
    url: str = ""
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def handle(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.requests.append(TokenRequest(headers=dict(request.headers), form=form))
        if self.release is not None:
            await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            return self.script.pop(0)
        token = f"tok{next(self._counter)}-{secrets.token_hex(12)}"
        self.issued.append(token)
        LEAKS.tokens.add(token)
        payload: dict[str, Any] = {"access_token": token, "token_type": "bearer"}
        if self.expires_in is not None:
            payload["expires_in"] = self.expires_in
        if self.scope is not None:
            payload["scope"] = self.scope
        return web.json_response(payload)


@dataclass
class UpstreamRequest:
    """One request the fake upstream received."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    body_length: int

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeUpstream:
    """An API that records what arrives and answers through handlers a test installs."""

    requests: list[UpstreamRequest] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    keep_bodies_up_to: int = 1024 * 1024
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        handler = self.handlers.get(path)
        if handler is not None and path.startswith("/stream"):
            self._record(request, b"", 0)
            return await handler(request)
        kept = bytearray()
        length = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            length += len(chunk)
            if len(kept) < self.keep_bodies_up_to:
                kept += chunk
        self._record(request, bytes(kept), length)
        if handler is not None:
            return await handler(request)
        return web.json_response(
            {"method": request.method, "path": request.raw_path, "length": length}
        )

    def _record(self, request: web.Request, body: bytes, length: int) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.requests.append(
            UpstreamRequest(request.method, request.raw_path, headers, body, length)
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for(
    condition: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until condition() is true, or fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--upstream-client",
        choices=["lean", "aiohttp"],
        default="lean",
        help="the upstream transport every proxy of the suite uses (default: lean)",
    )


@pytest.fixture(scope="session")
def upstream_client(request: pytest.FixtureRequest) -> str:
    """The transport under test: `make test` runs the functional suite with both. The
    fixtures that build a proxy (make_settings, start_proxy, proxy_process) give it to every
    proxy whose settings do not name a transport themselves."""
    kind: str = request.config.getoption("--upstream-client")
    return kind


def with_transport(settings: Settings, upstream_client: str) -> Settings:
    """`settings` with the transport under test, unless they name one themselves."""
    if "upstream_client" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"upstream_client": upstream_client})


# The environment's egress proxy variables, which would send the suite's loopback traffic to
# whatever proxy the machine running it names; the tests that want one set it themselves.
PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "no_proxy", "all_proxy"})


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TOKEN_PROXY_") or name.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(Path(__file__).parent / "data" / "empty"))


@pytest.fixture(autouse=True, scope="session")
def _no_leaks() -> Iterator[None]:
    """The session-wide leak check: fails the run if any secret or token escaped, naming the
    test during which each was captured (tokens are known once issued: a text captured
    before the token it holds was issued is found here)."""
    configure_test_logging()
    yield
    leaks = [leak for leak in LEAKS.leaks() if leak not in LEAKS.reported]
    assert not leaks, f"secrets or tokens leaked: {leaks}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """What is captured from a test's setup to its teardown is that test's."""
    LEAKS.begin(item.nodeid)
    try:
        return (yield)
    finally:
        LEAKS.end()


@pytest.fixture(autouse=True)
def _no_leaks_in_this_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test whose logs, responses, metrics pages or process logs hold the test
    secret or a token (at its teardown, after the teardown of every fixture it used)."""
    yield
    leaks = LEAKS.leaks(current_only=True)
    LEAKS.reported.update(leaks)
    if leaks:
        pytest.fail(f"{request.node.nodeid} leaked secrets or tokens: {leaks}", pytrace=False)


@pytest.fixture(autouse=True)
def _forget_tokens() -> Iterator[None]:
    yield
    redactor.clear()


@contextlib.asynccontextmanager
async def running_token_server() -> AsyncIterator[FakeTokenServer]:
    """A FakeTokenServer listening on loopback at its `url`, for the block's duration."""
    fake = FakeTokenServer()
    app = web.Application()
    app.router.add_post("/token", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/token"))
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
async def token_server() -> AsyncIterator[FakeTokenServer]:
    async with running_token_server() as fake:
        yield fake


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/")).rstrip("/")
    yield fake
    await server.close()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    token_server: FakeTokenServer, upstream: FakeUpstream, upstream_client: str
) -> SettingsFactory:
    """Settings for one credential and one route pointed at the fake servers, with the
    transport under test."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "client_id": TEST_CLIENT_ID,
            "client_secret": TEST_SECRET,
            "token_url": token_server.url,
            "upstream": upstream.url,
            "port": 0,
            "upstream_client": upstream_client,
        }
        values.update(overrides)
        return Settings(**values)

    return build


class ProxyTestServer(BaseTestServer):
    """An in-process proxy on loopback for TestClient, run as proxy.serve runs it: its runtime
    started, aiohttp's low-level server with its one handler, the runtime closed after the
    server. Every answer is shown to the leak watch."""

    def __init__(self, proxy: ProxyApp) -> None:
        super().__init__(host="127.0.0.1")
        self.proxy = proxy

    async def start_server(
        self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        await self.proxy.start()
        await super().start_server(loop, **kwargs)

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        server = self.proxy.server(_watched(self.proxy.handle))
        return web.ServerRunner(server, shutdown_timeout=self.proxy.settings.shutdown_timeout)

    async def close(self) -> None:
        await super().close()
        await self.proxy.close()


def _watched(
    handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def watched(request: web.BaseRequest) -> web.StreamResponse:
        response = await handle(request)
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        body = response.body if isinstance(response, web.Response) else None
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else ""
        LEAKS.add(f"the response to {request.method} {request.raw_path}", f"{headers}\n{text}")
        return response

    return watched


Client = TestClient[web.BaseRequest, None]
ProxyFactory = Callable[..., Awaitable[Client]]
PROBLEM_JSON = "application/problem+json"


def app_of(client: Client) -> ProxyApp:
    """The ProxyApp behind an in-process proxy's client."""
    server = client.server
    assert isinstance(server, ProxyTestServer)
    return server.proxy


def manager_of(client: Client, name: str = "default") -> TokenManager:
    """The TokenManager of one credential of an in-process proxy."""
    manager = app_of(client).runtime.tokens[name]
    assert isinstance(manager, TokenManager)
    return manager


def problem_of(status: int, content_type: str | None, body: bytes) -> dict[str, Any]:
    """Check an RFC 9457 problem document and return it."""
    assert content_type is not None
    assert content_type.split(";")[0].strip() == PROBLEM_JSON
    problem: dict[str, Any] = json.loads(body)
    assert problem["status"] == status
    for key in ("type", "title", "detail"):
        assert isinstance(problem[key], str)
        assert problem[key]
    return problem


@pytest.fixture
async def start_proxy(
    make_settings: SettingsFactory, upstream_client: str
) -> AsyncIterator[ProxyFactory]:
    """Start the proxy in-process, with the transport under test unless `settings` name one;
    the client reaches it on loopback."""
    clients: list[Client] = []

    async def start(settings: Settings | None = None, **overrides: Any) -> Client:
        if settings is None:
            settings = make_settings(**overrides)
        settings = with_transport(settings, upstream_client)
        client: Client = TestClient(
            ProxyTestServer(ProxyApp(settings)), connector=aiohttp.TCPConnector(limit=0)
        )
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        if app_of(client).runtime.settings.metrics_port is None:
            async with client.get("/-/metrics") as metrics:
                LEAKS.add("/-/metrics", await metrics.text())
        await client.close()


@dataclass
class ProxyProcess:
    """token-proxy running as a real process, as users run it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def status_kib(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise KeyError(field_name)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


StartProcess = Callable[..., Awaitable[ProxyProcess]]


def proxy_command() -> list[str]:
    return [sys.executable, "-m", "proxy"]


def process_env(
    *,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    port: int,
    upstream_client: str,
    secrets_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a real proxy process against the fake servers: the caller's own
    TOKEN_PROXY_* variables removed, debug logs, an empty secrets directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_PROXY_")}
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
            "TOKEN_PROXY_TOKEN_URL": token_server.url,
            "TOKEN_PROXY_UPSTREAM": upstream.url,
            "TOKEN_PROXY_PORT": str(port),
            "TOKEN_PROXY_LOG_LEVEL": "debug",
            "TOKEN_PROXY_UPSTREAM_CLIENT": upstream_client,
            "TOKEN_PROXY_SECRETS_DIR": str(secrets_dir),
            **(extra_env or {}),
        }
    )
    return env


@pytest.fixture
async def proxy_process(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path, upstream_client: str
) -> AsyncIterator[StartProcess]:
    """Start `python -m proxy run` against the fake servers and wait until it is ready."""
    started: list[ProxyProcess] = []
    transport = upstream_client

    async def start(extra_env: dict[str, str] | None = None) -> ProxyProcess:
        port = free_port()
        env = process_env(
            token_server=token_server,
            upstream=upstream,
            port=port,
            upstream_client=transport,
            secrets_dir=tmp_path,
            extra_env=extra_env,
        )
        log_path = tmp_path / f"proxy-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                proxy_command(), env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        proxy = ProxyProcess(process, f"http://127.0.0.1:{port}", log_path, env)
        started.append(proxy)
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(proxy.url + "/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            deadline = time.monotonic() + 15
            while not await ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"proxy did not become ready:\n{proxy.log_text()}")
                await asyncio.sleep(0.05)
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait()
        LEAKS.add(f"the log of proxy process {proxy.pid}", proxy.log_text())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own; fails (never skips) when there is none."""
    server = RedisServer(redis_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    """As redis_server, with `requirepass` set."""
    server = RedisServer(redis_binary(), tmp_path, password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.kill()
