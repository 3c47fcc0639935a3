"""Security of the whole proxy: listening safely, team keys, request targets that must never
choose the upstream, dot segments, header injection, request smuggling on raw sockets, and
the trust placed in upstream (TLS verification, CA bundles, redirects)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings, load_settings
from proxy.errors import ConfigError
from proxy.log import get_logger
from tests.conftest import (
    LEAKS,
    PROBLEM_JSON,
    TEST_CLIENT_ID,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    SettingsFactory,
    StartProcess,
    app_of,
    wait_for,
)

ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (refused, or bound only by the warning test)
WWW_AUTHENTICATE = 'Bearer realm="token-proxy"'
DASHBOARD_KEY = "dashboard-team-key-5d41402abc4b2a76"
BATCH_KEY = "batch-team-key-7d793037a0760186574b"
BATCH_SHA256 = hashlib.sha256(BATCH_KEY.encode()).hexdigest()
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
TIMEOUT = 10.0


# --- helpers -----------------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP/1.1 response off the wire, and the bytes that followed it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    rest: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 document of this reply, checked."""
        content_type = self.header("Content-Type") or ""
        assert content_type.split(";")[0].strip() == PROBLEM_JSON, self
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == self.status
        for key in ("type", "title", "detail"):
            assert isinstance(problem[key], str)
            assert problem[key]
        return problem

    def is_problem(self) -> bool:
        return (self.header("Content-Type") or "").startswith(PROBLEM_JSON)


def parse_reply(data: bytes) -> Reply:
    """Parse the first response in data (Content-Length framed, as the proxy's own are)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    # aiohttp answers what its parser rejects with a bare "HTTP/1.0 400 Bad Request".
    assert version in {"HTTP/1.1", "HTTP/1.0"}, lines[0]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r}"
        headers.append((name, value.strip()))
    reply = Reply(int(status), headers, b"", b"")
    length = reply.header("Content-Length")
    if length is None:
        assert (reply.header("Transfer-Encoding") or "").lower() != "chunked", reply
        reply.body = rest
        return reply
    reply.body, reply.rest = rest[: int(length)], rest[int(length) :]
    return reply


async def until_closed(client: Client, data: bytes) -> bytes:
    """Send data to the proxy and read until the proxy closes the connection; failing if it
    keeps the connection open (the request has no Connection: close of its own)."""
    assert client.host is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            async with asyncio.timeout(TIMEOUT):
                return await reader.read()
        except TimeoutError:
            raise AssertionError("the proxy left the connection open") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    host: str = "proxy.test",
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def raw(client: Client, data: bytes) -> Reply:
    """One exchange on a raw connection: exactly one response, then the connection closes."""
    reply = parse_reply(await until_closed(client, data))
    assert reply.rest == b"", f"bytes after the response: {reply.rest[:200]!r}"
    return reply


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


class LogTail:
    """The proxy's rendered in-process log (what an operator would read) from now on."""

    def __init__(self) -> None:
        self._start = len(LEAKS.log.getvalue())

    def text(self) -> str:
        return LEAKS.log.getvalue()[self._start :]

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]


async def requests_by_client(client: Client) -> dict[tuple[str, str], float]:
    """token_proxy_requests_total by (client, status) from /-/metrics."""
    async with client.get("/-/metrics") as response:
        assert response.status == 200
        text = await response.text()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "token_proxy_requests_total":
                key = (sample.labels["client"], sample.labels["status"])
                found[key] = found.get(key, 0.0) + sample.value
    return found


@contextlib.asynccontextmanager
async def other_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeUpstream]:
    """Another fake API on loopback: somewhere the proxy must never send anything."""
    fake = FakeUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=ssl_context)
    fake.url = str(server.make_url("/")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()


# Two team clients: one plain key, one key_sha256.
TEAM_CLIENTS = [
    {"name": "dashboard", "key": DASHBOARD_KEY},
    {"name": "batch", "key_sha256": BATCH_SHA256},
]


def team_settings(make_settings: SettingsFactory, **overrides: Any) -> Settings:
    """The shorthand settings plus the two team clients."""
    return make_settings(clients=TEAM_CLIENTS, **overrides)


def credential_and_routes(
    token_server: FakeTokenServer,
    routes: list[dict[str, Any]],
    *,
    clients: list[dict[str, str]] | None = None,
) -> Settings:
    return Settings.model_validate(
        {
            "port": 0,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": routes,
            "clients": clients or [],
        }
    )


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


LOOPBACK_TOML = (
    '[credentials.c]\nclient_id = "id"\nclient_secret = "secret-value"\n'
    'token_url = "http://127.0.0.1:9/token"\n'
    '[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:9"\ncredential = "c"\n'
)
CLIENTS_TOML = f'[[clients]]\nname = "batch"\nkey_sha256 = "{BATCH_SHA256}"\n'


def clean_env(tmp_path: Path) -> dict[str, str]:
    """os.environ without TOKEN_PROXY_* and with an empty secrets directory."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    env["TOKEN_PROXY_SECRETS_DIR"] = str(secrets)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, stdin: str = ""
) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(params=["llhttp", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test behind aiohttp's C parser (llhttp, strict) and again behind its pure-Python
    parser, so the proxy's own checks are exercised where a parser lets more through."""
    name: str = request.param
    if name == "python":
        monkeypatch.setattr(web_protocol, "HttpRequestParser", HttpRequestParserPy)
    return name


# --- 1. listen safely --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "clients", "exposed"),
    [
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
        ("localhost", False, False),
        (ALL_INTERFACES, False, True),
        ("::", False, True),
        ("192.168.1.10", False, True),
        ("proxy.example.com", False, True),
        ("localhost.example.com", False, True),
        ("127.0.0.1.nip.io", False, True),
        ("", False, True),
        (ALL_INTERFACES, True, False),
        ("192.168.1.10", True, False),
    ],
)
def test_exposed_anonymously_means_beyond_loopback_without_clients(
    host: str, clients: bool, exposed: bool
) -> None:
    """A listen address is exposed anonymously when it is not loopback and no [[clients]] exist."""
    values: dict[str, Any] = {
        "host": host,
        "allow_anonymous_remote": True,
        "credentials": {
            "c": {"client_id": "id", "client_secret": "s", "token_url": "http://127.0.0.1:9/t"}
        },
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": "c"}],
    }
    if clients:
        values["clients"] = [{"name": "batch", "key_sha256": BATCH_SHA256}]
    assert Settings.model_validate(values).exposed_anonymously is exposed


@pytest.mark.parametrize("host", [ALL_INTERFACES, "::", "10.1.2.3", "localhost.example.com", ""])
def test_non_loopback_host_without_clients_is_a_config_error(tmp_path: Path, host: str) -> None:
    """A non-loopback host with no [[clients]] is refused by load_settings, naming the way out."""
    config = write_toml(tmp_path, LOOPBACK_TOML)
    with pytest.raises(ConfigError) as caught:
        load_settings(flags={"host": host}, config_file=config)
    assert "allow_anonymous_remote" in caught.value.detail
    assert "[[clients]]" in caught.value.detail


def test_explicit_false_allow_anonymous_remote_is_still_refused(tmp_path: Path) -> None:
    """allow_anonymous_remote = false in the TOML file refuses a non-loopback host too."""
    config = write_toml(
        tmp_path, f'host = "{ALL_INTERFACES}"\nallow_anonymous_remote = false\n' + LOOPBACK_TOML
    )
    with pytest.raises(ConfigError, match="allow_anonymous_remote"):
        load_settings(config_file=config)


def test_non_loopback_host_with_clients_is_accepted(tmp_path: Path) -> None:
    """With [[clients]] configured a non-loopback host needs no allow_anonymous_remote."""
    config = write_toml(tmp_path, LOOPBACK_TOML + CLIENTS_TOML)
    settings = load_settings(flags={"host": ALL_INTERFACES}, config_file=config)
    assert settings.host == ALL_INTERFACES
    assert settings.allow_anonymous_remote is False
    assert not settings.exposed_anonymously


def test_non_loopback_host_without_clients_exits_2(tmp_path: Path) -> None:
    """`python -m proxy --host 0.0.0.0` without [[clients]] exits 2 before binding, no traceback."""
    config = write_toml(tmp_path, LOOPBACK_TOML)
    code, stdout, stderr = run_cli(
        ["--host", ALL_INTERFACES, "--config", str(config)], clean_env(tmp_path), tmp_path
    )
    assert code == 2, stderr
    assert stdout == ""
    assert "allow_anonymous_remote" in stderr
    assert "Traceback" not in stderr
    assert "listening" not in stderr


async def test_allowed_anonymous_remote_warns_at_start(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """With allow_anonymous_remote = true on a non-loopback host the proxy serves but logs a
    warning at start that anyone who reaches it can use the credentials."""
    proxy = await proxy_process(
        {"TOKEN_PROXY_HOST": ALL_INTERFACES, "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE": "true"}
    )
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    warnings = [
        line
        for line in lines
        if line.get("level") == "warning" and "allow_anonymous_remote" in line["event"]
    ]
    assert len(warnings) == 1, proxy.log_text()
    assert warnings[0]["host"] == ALL_INTERFACES


async def test_loopback_start_logs_no_anonymous_warning(
    proxy_process: StartProcess, upstream: FakeUpstream
) -> None:
    """On loopback the start-up warning about anonymous remote use is not logged."""
    proxy = await proxy_process()
    assert proxy.stop() == 0
    assert "allow_anonymous_remote" not in proxy.log_text()


# --- 2. team keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param([], id="missing"),
        pytest.param([("Authorization", "")], id="empty"),
        pytest.param([("Authorization", "Bearer")], id="bearer-without-key"),
        pytest.param([("Authorization", "Basic ZGFzaGJvYXJkOnNlY3JldA==")], id="basic"),
        pytest.param([("Authorization", f"Basic {DASHBOARD_KEY}")], id="basic-with-key"),
        pytest.param([("Authorization", DASHBOARD_KEY)], id="no-scheme"),
        pytest.param(bearer("wrong-key-of-sufficient-length"), id="wrong-key"),
        pytest.param(bearer(BATCH_SHA256), id="the-sha256-itself"),
        pytest.param([("X-Api-Key", DASHBOARD_KEY)], id="key-elsewhere"),
        pytest.param([("Proxy-Authorization", f"Bearer {DASHBOARD_KEY}")], id="proxy-auth"),
        pytest.param([*bearer(DASHBOARD_KEY), *bearer(BATCH_KEY)], id="two-keys"),
    ],
)
async def test_missing_malformed_or_wrong_team_key_is_401(
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    upstream: FakeUpstream,
    auth: list[tuple[str, str]],
) -> None:
    """In team mode a missing, malformed or wrong key gets a 401 problem+json with
    WWW-Authenticate: Bearer realm="token-proxy", and nothing is forwarded."""
    client = await start_proxy(team_settings(make_settings))
    reply = await raw(client, request("POST", "/api/thing", auth))
    assert reply.status == 401
    reply.problem()
    assert reply.header("WWW-Authenticate") == WWW_AUTHENTICATE
    assert DASHBOARD_KEY not in reply.body.decode()
    assert upstream.requests == []


async def test_right_team_key_is_replaced_by_the_upstream_token(
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    """A right key (plain or sha256) is forwarded with Authorization replaced by the upstream
    token; the key never reaches upstream, and the client's name is in the access line and in
    token_proxy_requests_total{client=...}."""
    tail = LogTail()
    client = await start_proxy(team_settings(make_settings))
    for key, path in ((DASHBOARD_KEY, "/one?k=1"), (BATCH_KEY, "/two"), (BATCH_KEY, "/three")):
        reply = await raw(client, request("GET", path, bearer(key)))
        assert reply.status == 200
    assert [seen.raw_path for seen in upstream.requests] == ["/one?k=1", "/two", "/three"]
    for seen in upstream.requests:
        auth = [value for name, value in seen.headers if name.lower() == "authorization"]
        assert auth == [f"Bearer {token_server.issued[0]}"]
        wire = json.dumps(seen.headers) + seen.raw_path + seen.body.decode("latin-1")
        assert DASHBOARD_KEY not in wire
        assert BATCH_KEY not in wire
    access = [line for line in tail.lines() if line.get("logger") == "proxy.access"]
    assert [(line["client"], line["status"]) for line in access] == [
        ("dashboard", 200),
        ("batch", 200),
        ("batch", 200),
    ]
    metrics = await requests_by_client(client)
    assert metrics[("dashboard", "200")] == 1
    assert metrics[("batch", "200")] == 2


async def test_refused_request_counts_as_anonymous_401(
    start_proxy: ProxyFactory, make_settings: SettingsFactory, upstream: FakeUpstream
) -> None:
    """A refused request is logged and counted under client '-', never under a team name."""
    tail = LogTail()
    client = await start_proxy(team_settings(make_settings))
    reply = await raw(client, request("GET", "/x", bearer("guessed-key-of-enough-length")))
    assert reply.status == 401
    access = [line for line in tail.lines() if line.get("logger") == "proxy.access"]
    assert [(line["client"], line["status"]) for line in access] == [("-", 401)]
    metrics = await requests_by_client(client)
    assert metrics == {("-", "401"): 1}
    assert upstream.requests == []


@pytest.mark.parametrize(
    "target", ["/api/thing", "/unrouted/thing", "/", "/api/../../x", "http://elsewhere/x"]
)
async def test_without_a_key_every_target_gets_the_same_401(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, target: str
) -> None:
    """In team mode the key is checked before routing: a request without a valid key gets the
    same 401 whether its prefix is routed, unknown or unsafe, so nobody can probe which routes
    exist; with the key, an unknown prefix is the 404 of no route."""
    routes = [{"prefix": "/api/", "upstream": upstream.url, "credential": "c"}]
    settings = credential_and_routes(token_server, routes, clients=TEAM_CLIENTS)
    client = await start_proxy(settings)
    for auth in ([], bearer("wrong-key-of-sufficient-length")):
        reply = await raw(client, request("GET", target, auth))
        assert reply.status == 401
        assert reply.problem()["title"] == "Team key missing or wrong"
    keyed = await raw(client, request("GET", "/unrouted/thing", bearer(BATCH_KEY)))
    assert keyed.status == 404
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready", "/-/metrics"])
async def test_reserved_paths_need_no_team_key(
    start_proxy: ProxyFactory, make_settings: SettingsFactory, path: str
) -> None:
    """/-/healthy, /-/ready and /-/metrics answer 200 without any team key."""
    client = await start_proxy(team_settings(make_settings))
    manager = app_of(client).runtime.tokens["default"]
    # /-/ready says 503 until the first token is in, whatever the key.
    await wait_for(lambda: bool(manager.state()["ready"]))
    async with client.get(path) as response:
        assert response.status == 200


async def test_plain_team_key_is_never_logged(
    start_proxy: ProxyFactory, make_settings: SettingsFactory, upstream: FakeUpstream
) -> None:
    """A key set as plain `key` is registered with the redactor: it never appears in the log,
    even where a log line would otherwise carry it."""
    tail = LogTail()

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream broke")

    upstream.handlers["/fails"] = fail
    client = await start_proxy(team_settings(make_settings))
    assert (await raw(client, request("GET", "/ok", bearer(DASHBOARD_KEY)))).status == 200
    assert (await raw(client, request("GET", "/fails", bearer(DASHBOARD_KEY)))).status == 500
    get_logger("proxy.test").warning("a line that mentions the key", note=f"k={DASHBOARD_KEY}")
    text = tail.text()
    assert "a line that mentions the key" in text
    assert DASHBOARD_KEY not in text
    async with client.get("/-/metrics") as response:
        assert DASHBOARD_KEY not in await response.text()


def test_hash_key_prints_the_sha256_of_the_key(tmp_path: Path) -> None:
    """`python -m proxy hash-key` prints the hex sha256 of the key read from stdin, only that."""
    code, stdout, stderr = run_cli(["hash-key"], clean_env(tmp_path), tmp_path, BATCH_KEY + "\n")
    assert code == 0, stderr
    assert stdout == BATCH_SHA256 + "\n"
    assert BATCH_KEY not in stdout + stderr


def test_hash_key_strips_a_windows_line_end(tmp_path: Path) -> None:
    """A key piped with CRLF hashes the same as with LF, so key_sha256 matches what is sent."""
    code, stdout, _ = run_cli(["hash-key"], clean_env(tmp_path), tmp_path, BATCH_KEY + "\r\n")
    assert code == 0
    assert stdout.strip() == BATCH_SHA256


@pytest.mark.parametrize("key", ["", "fifteen-chars!!"])
def test_hash_key_refuses_a_short_key(tmp_path: Path, key: str) -> None:
    """hash-key exits 2 for a key under 16 characters and prints no hash."""
    code, stdout, stderr = run_cli(["hash-key"], clean_env(tmp_path), tmp_path, key + "\n")
    assert code == 2
    assert stdout == ""
    assert "16" in stderr
    assert "Traceback" not in stderr


# --- 3. request targets ------------------------------------------------------------------------


async def test_host_header_never_chooses_the_upstream_in_team_mode(
    start_proxy: ProxyFactory, make_settings: SettingsFactory, upstream: FakeUpstream
) -> None:
    """A Host header naming another server sends the request to the configured upstream with
    its Host; the other server receives nothing, with or without a team key."""
    async with other_server() as elsewhere:
        client = await start_proxy(team_settings(make_settings))
        host = elsewhere.url.removeprefix("http://")
        keyed = await raw(client, request("GET", "/via-host", bearer(BATCH_KEY), host=host))
        assert keyed.status == 200
        unkeyed = await raw(client, request("GET", "/via-host-2", host=host))
        assert unkeyed.status == 401
        assert elsewhere.requests == []
    [seen] = upstream.requests
    assert seen.raw_path == "/via-host"
    assert seen.header("Host") == upstream.url.removeprefix("http://")


async def test_absolute_form_never_chooses_the_upstream_in_team_mode(
    start_proxy: ProxyFactory, make_settings: SettingsFactory, upstream: FakeUpstream
) -> None:
    """An absolute-form target naming another server is refused or goes to the configured
    upstream; the other server never receives the request or the token."""
    async with other_server() as elsewhere:
        client = await start_proxy(team_settings(make_settings))
        reply = await raw(client, request("GET", elsewhere.url + "/abs", bearer(BATCH_KEY)))
        assert elsewhere.requests == []
    if reply.status == 400:
        reply.problem()
        assert upstream.requests == []
    else:
        assert reply.status == 200
        assert [seen.raw_path for seen in upstream.requests] == ["/abs"]


@pytest.mark.parametrize("team", [False, True], ids=["anonymous", "team"])
async def test_connect_never_opens_a_tunnel(
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    upstream: FakeUpstream,
    team: bool,
) -> None:
    """CONNECT to another server gets a 4xx answer from the proxy and closes: no tunnel, and
    the bytes sent after it (a request for the tunnel) reach no one."""
    async with other_server() as elsewhere:
        settings = team_settings(make_settings) if team else make_settings()
        client = await start_proxy(settings)
        authority = elsewhere.url.removeprefix("http://")
        head = request("CONNECT", authority, bearer(BATCH_KEY), host=authority, close=False)
        data = await until_closed(client, head + SMUGGLED)
        reply = parse_reply(data)
        assert 400 <= reply.status < 500
        if reply.is_problem():
            reply.problem()
        assert b"HTTP/1.1 200" not in data
        assert elsewhere.requests == []
    assert upstream.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/eu/..",
        "/eu/../",
        "/eu/%2e%2e",
        "/eu/%2E%2E/x",
        "/eu/%2e%2E/x",
        "/eu/.%2e/x",
        "/eu/.%2E/x",
        "/eu/%2e./x",
        "/eu/./../x",
        "/eu//../x",
        "/eu/a/b/../../../x",
        "/eu/a/%2e%2e/%2E%2E/x",
        "/eu/a/./%2e%2e/../x?q=1",
        "/eu/..?",
    ],
)
async def test_dot_segments_climbing_above_the_prefix_are_400(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    target: str,
) -> None:
    """Every spelling of a '..' segment (raw, %2e%2e in any case, mixed) that climbs above the
    route prefix gets a 400 problem+json and is never forwarded."""
    settings = credential_and_routes(
        token_server,
        [
            {"prefix": "/eu/", "upstream": upstream.url + "/v2", "credential": "c"},
            {"prefix": "/", "upstream": upstream.url + "/root", "credential": "c"},
        ],
    )
    client = await start_proxy(settings)
    reply = await raw(client, request("GET", target))
    assert reply.status == 400
    reply.problem()
    assert upstream.requests == []


@pytest.mark.parametrize("target", ["/..", "/../x", "/%2e%2e/x", "/a/../../x", "/.%2E/etc"])
async def test_dot_segments_climbing_above_the_upstream_base_path_are_400(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    target: str,
) -> None:
    """On the root route a '..' climbing above the upstream's base path is refused with 400."""
    settings = credential_and_routes(
        token_server, [{"prefix": "/", "upstream": upstream.url + "/v2", "credential": "c"}]
    )
    client = await start_proxy(settings)
    reply = await raw(client, request("GET", target))
    assert reply.status == 400
    reply.problem()
    assert upstream.requests == []


@pytest.mark.parametrize("target", ["/eu/..#frag", "/eu/%2e%2e#", "/eu/a/../..#x"])
async def test_fragment_cannot_hide_a_climbing_dot_segment(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    target: str,
) -> None:
    """A '#' after a '..' segment (not allowed in a request target) never lets the '..' reach
    upstream above the route's base path: the request is refused with 400."""
    settings = credential_and_routes(
        token_server,
        [{"prefix": "/eu/", "upstream": upstream.url + "/v2", "credential": "c"}],
    )
    client = await start_proxy(settings)
    reply = await raw(client, request("GET", target))
    assert reply.status == 400
    assert upstream.requests == []


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"X-Injected: a\rb", id="cr"),
        pytest.param(b"X-Injected: a\x00b", id="nul"),
        pytest.param(b"X-Injected: a\r\rb", id="two-cr"),
        pytest.param(b"X-Injected: a\r Evil: yes", id="cr-then-header"),
        pytest.param(b"X-Injected: a\nEvil: yes", id="bare-lf"),
    ],
)
async def test_cr_lf_or_nul_in_a_header_value_is_never_forwarded(
    start_proxy: ProxyFactory, upstream: FakeUpstream, parser: str, header: bytes
) -> None:
    """CR, LF or NUL inside a header value gets a 400 (problem+json, or the parser's bare 400)
    and a closed connection, and nothing reaches upstream."""
    client = await start_proxy()
    data = b"GET /inject HTTP/1.1\r\nHost: proxy.test\r\n" + header + b"\r\n\r\n"
    reply = parse_reply(await until_closed(client, data))
    assert reply.status == 400
    if reply.is_problem():
        reply.problem()
    assert upstream.requests == []


# --- 4. request smuggling ----------------------------------------------------------------------


def smuggle(*headers: bytes, body: bytes) -> bytes:
    """A POST with the given header lines, keep-alive, and a body hiding a second request."""
    head = b"POST /front HTTP/1.1\r\nHost: proxy.test\r\n" + b"".join(h + b"\r\n" for h in headers)
    return head + b"\r\n" + body


CHUNKED_THEN_SMUGGLED = b"0\r\n\r\n" + SMUGGLED


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            smuggle(b"Content-Length: 5", b"Content-Length: 6", body=b"12345" + SMUGGLED),
            id="two-content-lengths",
        ),
        pytest.param(smuggle(b"Content-Length: 5, 6", body=b"12345" + SMUGGLED), id="cl-list"),
        pytest.param(smuggle(b"Content-Length: +5", body=b"12345" + SMUGGLED), id="cl-plus"),
        pytest.param(smuggle(b"Content-Length: 0x5", body=b"12345" + SMUGGLED), id="cl-hex"),
        pytest.param(
            smuggle(
                b"Content-Length: %d" % len(CHUNKED_THEN_SMUGGLED),
                b"Transfer-Encoding: chunked",
                body=CHUNKED_THEN_SMUGGLED,
            ),
            id="cl-and-te",
        ),
        pytest.param(
            smuggle(
                b"Transfer-Encoding: chunked",
                b"Content-Length: 3",
                body=CHUNKED_THEN_SMUGGLED,
            ),
            id="te-and-cl",
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding: gzip, chunked", body=CHUNKED_THEN_SMUGGLED),
            id="te-gzip-chunked",
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding: identity", body=CHUNKED_THEN_SMUGGLED), id="te-identity"
        ),
        pytest.param(smuggle(b"Transfer-Encoding: gzip", body=CHUNKED_THEN_SMUGGLED), id="te-gzip"),
        pytest.param(
            smuggle(
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: gzip",
                body=CHUNKED_THEN_SMUGGLED,
            ),
            id="te-chunked-then-gzip",
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding: chunked, chunked", body=CHUNKED_THEN_SMUGGLED),
            id="te-chunked-chunked",
        ),
        pytest.param(
            smuggle(
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: chunked",
                body=CHUNKED_THEN_SMUGGLED,
            ),
            id="te-twice",
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding: xchunked", body=CHUNKED_THEN_SMUGGLED), id="te-unknown"
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding : chunked", body=CHUNKED_THEN_SMUGGLED),
            id="space-before-colon",
        ),
        pytest.param(
            smuggle(b"Transfer-Encoding:\r\n chunked", body=CHUNKED_THEN_SMUGGLED),
            id="obs-fold-te",
        ),
        pytest.param(
            smuggle(b"Content-Length: 5", b"X-Folded: a\r\n b", body=b"12345" + SMUGGLED),
            id="obs-fold",
        ),
        pytest.param(
            smuggle(b"Content-Length: 5", b"X-Folded: a\r\n\tb", body=b"12345" + SMUGGLED),
            id="obs-fold-tab",
        ),
    ],
)
async def test_ambiguous_framing_is_400_and_closes_the_connection(
    start_proxy: ProxyFactory, upstream: FakeUpstream, parser: str, data: bytes
) -> None:
    """Conflicting or malformed Content-Length, Content-Length with Transfer-Encoding, any
    transfer coding but a single chunked, and obs-fold are refused with 400, the connection is
    closed after the response, and neither request reaches upstream."""
    client = await start_proxy()
    received = await until_closed(client, data)
    reply = parse_reply(received)
    assert reply.status == 400, received[:500]
    if reply.is_problem():
        reply.problem()
    assert reply.rest == b"", f"a second response followed: {reply.rest[:300]!r}"
    assert not any("smuggled" in seen.raw_path for seen in upstream.requests)
    assert upstream.requests == []


async def test_well_framed_requests_keep_the_connection_open(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    """Control for the smuggling tests: a well-framed chunked POST and a GET pipelined on one
    keep-alive connection are both forwarded, and the connection stays open."""
    client = await start_proxy()
    assert client.host is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            smuggle(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n") + SMUGGLED
        )
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            while len(upstream.requests) < 2:
                await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert [(seen.raw_path, seen.body) for seen in upstream.requests] == [
        ("/front", b"hello"),
        ("/smuggled", b""),
    ]


# --- 5. upstream trust -------------------------------------------------------------------------


@dataclass
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def self_signed(directory: Path, name: str, san: str) -> Certificate:
    """A throw-away self-signed certificate made with openssl."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make test certificates"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            f"subjectAltName={san}",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certificate]:
    """Two self-signed certificates: one for 127.0.0.1 and localhost, one for another name."""
    directory = tmp_path_factory.mktemp("tls")
    return {
        "loopback": self_signed(directory, "loopback", "IP:127.0.0.1,DNS:localhost"),
        "elsewhere": self_signed(directory, "elsewhere", "DNS:wrong.example"),
    }


async def test_self_signed_upstream_is_502_unless_its_ca_bundle_is_configured(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    certificates: dict[str, Certificate],
) -> None:
    """Certificate verification is always on: a self-signed https upstream is a 502 problem
    and gets nothing, while the route naming that certificate as ca_bundle gets 200."""
    cert = certificates["loopback"]
    async with other_server(cert.server_context()) as tls:
        assert tls.url.startswith("https://127.0.0.1:")
        settings = credential_and_routes(
            token_server,
            [
                {"prefix": "/trusted/", "upstream": tls.url, "credential": "c",
                 "ca_bundle": str(cert.cert)},
                {"prefix": "/plain/", "upstream": tls.url, "credential": "c"},
            ],
        )  # fmt: skip
        client = await start_proxy(settings)
        plain = await raw(client, request("GET", "/plain/x"))
        assert plain.status == 502
        assert "certificate" in plain.problem()["detail"]
        assert tls.requests == []
        trusted = await raw(client, request("GET", "/trusted/y"))
        assert trusted.status == 200
        [seen] = tls.requests
        assert seen.raw_path == "/y"
        assert seen.header("Authorization") == f"Bearer {token_server.issued[0]}"


async def test_ca_bundle_never_turns_off_hostname_verification(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    certificates: dict[str, Certificate],
) -> None:
    """A trusted certificate that does not name the upstream host is refused with 502."""
    cert = certificates["elsewhere"]
    async with other_server(cert.server_context()) as tls:
        settings = credential_and_routes(
            token_server,
            [{"prefix": "/", "upstream": tls.url, "credential": "c", "ca_bundle": str(cert.cert)}],
        )
        client = await start_proxy(settings)
        reply = await raw(client, request("GET", "/x"))
        assert reply.status == 502
        reply.problem()
        assert tls.requests == []


@pytest.mark.parametrize(
    "content", ["not a certificate\n", "", None], ids=["text", "empty", "missing"]
)
def test_ca_bundle_that_is_not_a_pem_file_is_a_config_error(
    tmp_path: Path, content: str | None
) -> None:
    """A ca_bundle that is not a readable PEM file is a ConfigError naming ca_bundle."""
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_text(content, encoding="utf-8")
    config = write_toml(tmp_path, LOOPBACK_TOML + f'ca_bundle = "{bundle}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config)
    assert "ca_bundle" in caught.value.detail
    assert str(bundle) in caught.value.detail


def test_ca_bundle_that_is_a_pem_certificate_is_accepted(
    tmp_path: Path, certificates: dict[str, Certificate]
) -> None:
    """A PEM certificate file is accepted as a route's ca_bundle."""
    cert = certificates["loopback"].cert
    config = write_toml(tmp_path, LOOPBACK_TOML + f'ca_bundle = "{cert}"\n')
    assert load_settings(config_file=config).routes[0].ca_bundle == cert


@pytest.mark.parametrize(
    "upstream_url",
    [
        "http://localhost.example.com",
        "http://127.0.0.1.example.com:8080",
        "http://0.0.0.0:8080",
        "http://[::ffff:10.0.0.1]",
        "ftp://127.0.0.1",
        "http://user:pass@127.0.0.1",
    ],
)
def test_upstream_must_be_https_unless_loopback(tmp_path: Path, upstream_url: str) -> None:
    """A route upstream that is not https:// to a remote host, nor http:// to loopback, is a
    ConfigError: the token would travel in clear text or to an unintended place."""
    config = write_toml(
        tmp_path,
        '[credentials.c]\nclient_id = "id"\nclient_secret = "secret-value"\n'
        'token_url = "http://127.0.0.1:9/token"\n'
        f'[[routes]]\nprefix = "/"\nupstream = "{upstream_url}"\ncredential = "c"\n',
    )
    with pytest.raises(ConfigError, match="upstream"):
        load_settings(config_file=config)


async def test_token_never_follows_a_redirect_to_another_origin(
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    """A 302 from upstream to another loopback server is returned to the client as is; that
    server receives nothing, and the token appears nowhere in the answer."""
    async with other_server() as elsewhere:
        location = elsewhere.url + "/collect?from=upstream"

        async def redirect(request: web.Request) -> web.StreamResponse:
            return web.Response(status=302, headers={"Location": location}, text="moved")

        upstream.handlers["/moved"] = redirect
        client = await start_proxy(team_settings(make_settings))
        reply = await raw(client, request("GET", "/moved", bearer(BATCH_KEY)))
        assert reply.status == 302
        assert reply.header("Location") == location
        assert elsewhere.requests == []
    [token] = token_server.issued
    assert token not in json.dumps(reply.headers) + reply.body.decode("latin-1")
    assert len(upstream.requests) == 1
