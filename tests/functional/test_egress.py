"""Behind an egress proxy, a real one (tinyproxy on loopback): tokens and upstreams through it,
https upstreams tunnelled with CONNECT and their names verified, NO_PROXY, outbound_proxy over
the environment, Basic authentication and its 407, the proxy down, a tunnel refused (403), and
what /-/ready and `check` say. `make test` runs these with both transports."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Settings
from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    SettingsFactory,
    StartProcess,
    free_port,
    manager_of,
    problem_of,
    wait_for,
)
from tests.functional.test_cli import assert_config_error, run_cli_async
from tests.functional.test_security import Certificate, other_server, self_signed
from tests.functional.tinyproxy import Tinyproxy, relay_to

PROXY_USER = "egress-user"
PROXY_PASSWORD = "Egress-Pa55word-Never-Shown-4b1d"
StartTinyproxy = Callable[..., Tinyproxy]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[StartTinyproxy]:
    """Start tinyproxy processes of this test's own (stopped at its end)."""
    started: list[Tinyproxy] = []

    def start(**options: Any) -> Tinyproxy:
        proxy = Tinyproxy(tmp_path, **options)
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def authenticating(tinyproxy: StartTinyproxy) -> Tinyproxy:
    """A tinyproxy that wants Basic credentials."""
    LEAKS.tokens.add(PROXY_PASSWORD)  # the session's leak check looks for it everywhere too
    return tinyproxy(user=PROXY_USER, password=PROXY_PASSWORD)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certificate]:
    directory = tmp_path_factory.mktemp("egress-tls")
    return {
        "loopback": self_signed(directory, "loopback", "IP:127.0.0.1,DNS:localhost"),
        "elsewhere": self_signed(directory, "elsewhere", "DNS:wrong.example"),
    }


@pytest.fixture
async def tls_upstream(certificates: dict[str, Certificate]) -> AsyncIterator[FakeUpstream]:
    """An https upstream on loopback whose certificate only its ca_bundle trusts."""
    async with other_server(certificates["loopback"].server_context()) as server:
        yield server


def routes_settings(
    token_server: FakeTokenServer,
    routes: list[dict[str, Any]],
    *,
    credential: dict[str, Any] | None = None,
    **top: Any,
) -> Settings:
    """One credential `c` at the fake token server and `routes`, built now: the environment's
    proxy variables are read at this point, as when the proxy loads its configuration."""
    return Settings.model_validate(
        {
            "port": 0,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                    **(credential or {}),
                }
            },
            "routes": [{"credential": "c", **route} for route in routes],
            **top,
        }
    )


def dead_proxy() -> str:
    """An egress proxy address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    return problem_of(status, response.headers.get("Content-Type"), await response.read())


def tls_route(
    tls: FakeUpstream, cert: Certificate, prefix: str = "/tls/", **more: Any
) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": tls.url, "ca_bundle": str(cert.cert), **more}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


# --- through the proxy ---------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
async def test_token_and_upstream_go_through_the_proxy_the_environment_names(
    *,
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """HTTP_PROXY (either case) sends the token request and the upstream request of http://
    URLs to the egress proxy in absolute form: the proxy's log has both, and both arrive with
    its Via header, the upstream one with the token."""
    egress = tinyproxy()
    monkeypatch.setenv(variable, egress.url)
    client = await start_proxy(make_settings())
    async with client.get("/v1/items?q=1") as response:
        assert response.status == 200, await response.text()
    requests = egress.requests()
    assert ("POST", token_server.url) in requests
    assert ("GET", upstream.url + "/v1/items?q=1") in requests
    [token_request] = token_server.requests
    assert "tinyproxy" in token_request.headers.get("Via", "")
    [seen] = upstream.requests
    assert seen.raw_path == "/v1/items?q=1"
    assert "tinyproxy" in (seen.header("Via") or "")
    assert seen.header("Authorization") == f"Bearer {token_server.issued[0]}"


async def test_https_upstream_is_tunnelled_and_the_proxy_never_sees_the_token(
    *,
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An https:// upstream goes through HTTPS_PROXY as a CONNECT tunnel with TLS to the real
    host inside, verified with the route's ca_bundle: a tap in front of the proxy sees the
    CONNECT and never the token, and two requests share one pooled tunnel."""
    egress = tinyproxy()
    async with relay_to(egress.port) as tap:
        monkeypatch.setenv("HTTPS_PROXY", tap.url)
        client = await start_proxy(
            routes_settings(token_server, [tls_route(tls_upstream, certificates["loopback"])])
        )
        for path in ("/tls/one", "/tls/two"):
            async with client.get(path) as response:
                assert response.status == 200, await response.text()
        target = f"127.0.0.1:{port_of(tls_upstream.url)}"
        assert egress.connects() == [target]
        assert tap.connections == 1
        assert f"CONNECT {target} HTTP/1.1\r\n".encode() in tap.sent
        token = token_server.issued[0]
        assert token.encode() not in tap.sent
        assert b"Bearer" not in tap.sent
        assert [r.raw_path for r in tls_upstream.requests] == ["/one", "/two"]
        for seen in tls_upstream.requests:
            assert seen.header("Authorization") == f"Bearer {token}"
            assert {"proxy-authorization", "via"}.isdisjoint(seen.header_names())
    # The token request (http://) had no proxy: HTTP_PROXY is not set.
    assert ("POST", token_server.url) not in egress.requests()


async def test_large_bodies_stream_both_ways_through_the_tunnel(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    tinyproxy: StartTinyproxy,
) -> None:
    """Bodies larger than the client's flow-control buffers go up and come down whole through
    a tunnel (TLS over the CONNECT), on the same pooled tunnel."""
    egress = tinyproxy()
    payload = secrets.token_bytes(3 * 1024 * 1024)

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    tls_upstream.handlers["/down"] = download
    route = tls_route(tls_upstream, certificates["loopback"], outbound_proxy=egress.url)
    client = await start_proxy(routes_settings(token_server, [route]))
    async with client.post("/tls/up", data=io.BytesIO(payload)) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["length"] == len(payload)
    async with client.get("/tls/down") as response:
        assert response.status == 200
        got = await response.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert tls_upstream.requests[0].body == payload[: len(tls_upstream.requests[0].body)]
    assert egress.connects() == [f"127.0.0.1:{port_of(tls_upstream.url)}"]


async def test_the_tunnel_still_verifies_the_upstreams_name(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    certificates: dict[str, Certificate],
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the tunnel, the certificate must name the upstream's host: one that names
    another host is a 502 about the certificate, and upstream gets nothing."""
    egress = tinyproxy()
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    cert = certificates["elsewhere"]
    async with other_server(cert.server_context()) as tls:
        client = await start_proxy(routes_settings(token_server, [tls_route(tls, cert)]))
        async with client.get("/tls/x") as response:
            found = await problem(response, 502)
        assert "certificate" in found["detail"]
        assert egress.connects() == [f"127.0.0.1:{port_of(tls.url)}"]
        assert tls.requests == []


# --- NO_PROXY and outbound_proxy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "no_proxy", ["127.0.0.1", "*", " example.com , 127.0.0.1 ", ".0.0.1", "localhost,127.0.0.1"]
)
async def test_hosts_no_proxy_names_go_direct(
    *,
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    upstream: FakeUpstream,
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
) -> None:
    """A host NO_PROXY names, as urllib matches it (the host, a suffix, `*`), is reached
    directly, token endpoint and upstream alike: the proxy sees nothing."""
    egress = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", egress.url)
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    client = await start_proxy(make_settings())
    async with client.get("/direct") as response:
        assert response.status == 200, await response.text()
    assert egress.requests() == []
    [seen] = upstream.requests
    assert seen.header("Via") is None


async def test_no_proxy_with_a_port_matches_that_port_only(
    *,
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY=127.0.0.1:PORT sends only that port directly: the upstream goes direct and the
    token endpoint, on another port of the same host, through the proxy."""
    egress = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", egress.url)
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{port_of(upstream.url)}")
    client = await start_proxy(make_settings())
    async with client.get("/x") as response:
        assert response.status == 200
    assert egress.requests() == [("POST", token_server.url)]


async def test_outbound_proxy_replaces_the_environments_proxy(
    *,
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """outbound_proxy wins over HTTP_PROXY (here a dead one): everything goes through it."""
    egress = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    client = await start_proxy(make_settings(outbound_proxy=egress.url))
    async with client.get("/x") as response:
        assert response.status == 200, await response.text()
    assert egress.requests() == [("POST", token_server.url), ("GET", upstream.url + "/x")]


@pytest.mark.parametrize("where", ["top", "route and credential"])
async def test_empty_outbound_proxy_turns_the_environments_off(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """outbound_proxy = "" (top level, or of a route and a credential) means direct, whatever
    HTTP_PROXY says: with a dead one in the environment, everything still works."""
    monkeypatch.setenv("HTTP_PROXY", dead_proxy())
    monkeypatch.setenv("HTTPS_PROXY", dead_proxy())
    route: dict[str, Any] = {"prefix": "/", "upstream": upstream.url}
    if where == "top":
        settings = routes_settings(token_server, [route], outbound_proxy="")
    else:
        route["outbound_proxy"] = ""
        settings = routes_settings(token_server, [route], credential={"outbound_proxy": ""})
    client = await start_proxy(settings)
    async with client.get("/x") as response:
        assert response.status == 200, await response.text()
    assert len(upstream.requests) == 1


async def test_no_proxy_still_applies_to_outbound_proxy(
    start_proxy: ProxyFactory,
    make_settings: SettingsFactory,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY exempts a host from outbound_proxy too: a dead outbound_proxy is never used
    for the hosts it names."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = await start_proxy(make_settings(outbound_proxy=dead_proxy()))
    async with client.get("/x") as response:
        assert response.status == 200, await response.text()
    assert len(upstream.requests) == 1


# --- authentication ------------------------------------------------------------------------------


async def test_proxy_credentials_go_as_basic_proxy_authorization_and_stay_secret(
    *,
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    authenticating: Tinyproxy,
    proxy_log: Any,
) -> None:
    """The user and password of outbound_proxy reach the egress proxy as Proxy-Authorization
    (Basic): on each absolute-form request, and on the CONNECT only for an https upstream,
    which never gets the header. They appear in no log line, nor in /-/ready or /-/metrics."""
    basic = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    async with relay_to(authenticating.port) as tap:
        proxy_url = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{tap.listen_port}"
        settings = routes_settings(
            token_server,
            [
                {"prefix": "/plain/", "upstream": upstream.url},
                tls_route(tls_upstream, certificates["loopback"]),
            ],
            outbound_proxy=proxy_url,
        )
        client = await start_proxy(settings)
        for path in ("/plain/a", "/tls/b"):
            async with client.get(path) as response:
                assert response.status == 200, await response.text()
        sent = bytes(tap.sent)
    assert sent.count(f"Proxy-Authorization: Basic {basic}\r\n".encode()) == 3
    target = f"127.0.0.1:{port_of(tls_upstream.url)}"
    connect = sent.index(f"CONNECT {target} HTTP/1.1".encode())
    assert f"Proxy-Authorization: Basic {basic}".encode() in sent[connect : connect + 300]
    [tunnelled] = tls_upstream.requests
    assert "proxy-authorization" not in tunnelled.header_names()
    assert authenticating.connects() == [target]
    async with client.get("/-/ready") as ready:
        text = await ready.text()
        assert ready.status == 200, text
    async with client.get("/-/metrics") as metrics:
        text += await metrics.text()
    for shown in (text, proxy_log.text()):
        assert PROXY_PASSWORD not in shown
        assert basic not in shown


async def test_tunnel_without_proxy_credentials_is_502_saying_407(
    *,
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    authenticating: Tinyproxy,
) -> None:
    """A proxy that wants credentials and got none: 502 problem+json naming the egress
    proxy and its 407, with the fix, for a tunnel and for an absolute-form request alike;
    upstream gets nothing."""
    settings = routes_settings(
        token_server,
        [
            tls_route(tls_upstream, certificates["loopback"], outbound_proxy=authenticating.url),
            {"prefix": "/plain/", "upstream": upstream.url, "outbound_proxy": authenticating.url},
        ],
    )
    client = await start_proxy(settings)
    async with client.get("/tls/x") as response:
        tunnel = await problem(response, 502)
    async with client.get("/plain/x") as response:
        plain = await problem(response, 502)
    for found, what in ((tunnel, "tunnel"), (plain, "request")):
        assert found["title"] == "Egress proxy unreachable or refusing"
        assert f"the egress proxy {authenticating.url} (routes[" in found["detail"]
        assert f"refused the {what}" in found["detail"]
        assert "407 Proxy Authentication Required" in found["detail"]
        assert "user and password" in found["detail"]
    assert tls_upstream.requests == []
    assert upstream.requests == []


async def test_wrong_proxy_password_says_to_check_it(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    authenticating: Tinyproxy,
) -> None:
    """Credentials the proxy refuses (407; tinyproxy answers 401) are a 502 saying so, with
    the status, and to check outbound_proxy's user and password (never quoting them)."""
    wrong = f"http://{PROXY_USER}:not-the-password@127.0.0.1:{authenticating.port}"
    client = await start_proxy(
        routes_settings(
            token_server,
            [tls_route(tls_upstream, certificates["loopback"], outbound_proxy=wrong)],
        )
    )
    async with client.get("/tls/x") as response:
        found = await problem(response, 502)
    assert "refused the tunnel to 127.0.0.1:" in found["detail"]
    assert ": 401 Unauthorized; " in found["detail"]
    assert found["detail"].endswith("check routes[0].outbound_proxy's user and password")
    assert "not-the-password" not in json.dumps(found)


async def test_token_fetch_refused_by_the_proxy_shows_in_ready(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    authenticating: Tinyproxy,
) -> None:
    """A token request the egress proxy refuses (407) shows in /-/ready with the proxy named,
    and no request reaches the token endpoint."""
    settings = routes_settings(
        token_server,
        [{"prefix": "/", "upstream": upstream.url}],
        credential={"outbound_proxy": authenticating.url},
    )
    client = await start_proxy(settings)
    await wait_for(lambda: manager_of(client, "c").status().failures >= 1)
    async with client.get("/-/ready") as response:
        found = await problem(response, 503)
    state = found["credentials"]["c"]
    assert state["last_error"] == "egress_proxy"
    description = state["last_error_description"]
    assert f"the egress proxy {authenticating.url} (credentials.c.outbound_proxy)" in description
    assert "407" in description
    assert token_server.requests == []


# --- the proxy down, the tunnel refused ----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_egress_proxy_down_is_502_naming_it(
    *,
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    scheme: str,
) -> None:
    """Nobody listening at the egress proxy: 502 problem+json that blames the egress proxy
    (its address and the setting), not the upstream."""
    down = dead_proxy()
    if scheme == "https":
        route = tls_route(tls_upstream, certificates["loopback"], prefix="/", outbound_proxy=down)
    else:
        route = {"prefix": "/", "upstream": upstream.url, "outbound_proxy": down}
    client = await start_proxy(routes_settings(token_server, [route]))
    async with client.get("/x") as response:
        found = await problem(response, 502)
    assert found["title"] == "Egress proxy unreachable or refusing"
    assert found["detail"].startswith(
        f"cannot connect to the egress proxy {down} (routes[0].outbound_proxy): "
    )


async def test_token_fetch_through_a_dead_proxy_shows_in_ready(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """The token endpoint behind a dead egress proxy: /-/ready is 503 and says which proxy
    could not be reached; a request waiting for the token gets 503 saying it too."""
    down = dead_proxy()
    settings = routes_settings(
        token_server,
        [{"prefix": "/", "upstream": upstream.url}],
        credential={"outbound_proxy": down},
        token_wait_timeout=0.2,
    )
    client = await start_proxy(settings)
    await wait_for(lambda: manager_of(client, "c").status().failures >= 1)
    async with client.get("/-/ready") as response:
        found = await problem(response, 503)
    state = found["credentials"]["c"]
    assert state["last_error"] == "egress_proxy"
    assert state["last_error_description"].startswith(
        f"cannot connect to the egress proxy {down} (credentials.c.outbound_proxy)"
    )
    async with client.get("/x") as response:
        waited = await problem(response, 503)
    assert f"egress proxy {down}" in waited["detail"]


async def test_connect_to_a_port_the_proxy_forbids_is_502_saying_403(
    *,
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
    tinyproxy: StartTinyproxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy whose rules refuse the CONNECT (tinyproxy's ConnectPort allows 443 only): 502
    naming the egress proxy, its 403 and what to ask for; upstream gets nothing."""
    egress = tinyproxy(connect_ports=(443,))
    monkeypatch.setenv("HTTPS_PROXY", egress.url)
    client = await start_proxy(
        routes_settings(token_server, [tls_route(tls_upstream, certificates["loopback"])])
    )
    async with client.get("/tls/x") as response:
        found = await problem(response, 502)
    target = f"127.0.0.1:{port_of(tls_upstream.url)}"
    assert found["detail"].startswith(
        f"the egress proxy {egress.url} (HTTPS_PROXY) refused the tunnel to {target}: 403 "
    )
    assert "NO_PROXY" in found["detail"]
    assert egress.connects() == [target]
    assert tls_upstream.requests == []


async def test_tunnel_to_an_upstream_the_proxy_cannot_reach_says_so(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, tinyproxy: StartTinyproxy
) -> None:
    """The egress proxy answers the CONNECT with its own 5xx when it cannot reach the
    upstream: the 502 says that the proxy could not reach it."""
    egress = tinyproxy()
    dead = f"https://127.0.0.1:{free_port()}"
    route = {"prefix": "/", "upstream": dead, "outbound_proxy": egress.url}
    client = await start_proxy(routes_settings(token_server, [route]))
    async with client.get("/x") as response:
        found = await problem(response, 502)
    assert found["detail"].startswith(f"the egress proxy {egress.url} (routes[0].outbound_proxy)")
    assert f"the proxy could not reach 127.0.0.1:{port_of(dead)}" in found["detail"]


async def test_egress_proxy_that_never_answers_is_502_within_connect_timeout(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    tls_upstream: FakeUpstream,
    certificates: dict[str, Certificate],
) -> None:
    """A proxy that takes the connection and never answers the CONNECT costs connect_timeout,
    then a 502 naming the proxy and the timeout."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        mute = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        route = tls_route(tls_upstream, certificates["loopback"], prefix="/", outbound_proxy=mute)
        client = await start_proxy(routes_settings(token_server, [route], connect_timeout=0.3))
        started = time.monotonic()
        async with client.get("/x") as response:
            found = await problem(response, 502)
        assert time.monotonic() - started < 3
        assert f"egress proxy {mute}" in found["detail"]
        assert "within connect_timeout (0.3 s)" in found["detail"]
        assert tls_upstream.requests == []
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# --- check, and the real process -----------------------------------------------------------------


def check_tables(stdout: str) -> list[list[dict[str, str]]]:
    """check's tables (credentials, then routes), each row a dict by column, cut where the
    header's columns start (a cell such as "3600 s" holds a space)."""
    found = []
    for block in stdout.strip().split("\n\n"):
        header, *lines = block.splitlines()
        names = header.split()
        starts = [header.index(f"{name}") for name in names]
        ends = [*starts[1:], None]
        found.append(
            [
                {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
                for line in lines
            ]
        )
    return found


def check_env(clean_env: dict[str, str], token_url: str, **extra: str) -> dict[str, str]:
    env = dict(clean_env)
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
            "TOKEN_PROXY_TOKEN_URL": token_url,
            "TOKEN_PROXY_UPSTREAM": "http://localhost:9",
            **extra,
        }
    )
    return env


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    secrets = tmp_path / "empty-secrets"
    secrets.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    env["TOKEN_PROXY_SECRETS_DIR"] = str(secrets)
    return env


async def test_check_prints_the_egress_proxy_of_each_credential_and_route(
    token_server: FakeTokenServer,
    authenticating: Tinyproxy,
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """`check` fetches the token through the egress proxy and prints, for each credential and
    each route, which proxy it uses (its address, never its password) or `direct`."""
    env = check_env(
        clean_env,
        token_server.url,
        HTTP_PROXY=authenticating.url_with_credentials,
        NO_PROXY="localhost",
    )
    result = await run_cli_async(["check", "--log-level", "debug"], env, tmp_path)
    assert result.returncode == 0, result
    [credential], [route] = check_tables(result.stdout)
    assert credential["egress_proxy"] == authenticating.url
    assert credential["result"] == "ok"
    assert route["egress_proxy"] == "direct"
    assert ("POST", token_server.url) in authenticating.requests()
    for stream in (result.stdout, result.stderr):
        assert PROXY_PASSWORD not in stream
        assert TEST_SECRET not in stream


async def test_check_names_a_dead_egress_proxy_and_exits_1(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check` through an egress proxy nobody runs: exit 1, the proxy named in the result."""
    down = dead_proxy()
    env = check_env(clean_env, token_server.url, TOKEN_PROXY_OUTBOUND_PROXY=down)
    result = await run_cli_async(["check"], env, tmp_path)
    assert result.returncode == 1, result
    assert f"FAILED: cannot connect to the egress proxy {down} (outbound_proxy)" in result.stdout
    assert "Traceback" not in result.stderr
    assert token_server.requests == []


async def test_the_process_fetches_and_forwards_through_the_proxy(
    proxy_process: StartProcess,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tinyproxy: StartTinyproxy,
    certificates: dict[str, Certificate],
) -> None:
    """token-proxy as users run it, with two workers (uvloop's event loop when installed):
    HTTP_PROXY for the supervisor's token request, HTTPS_PROXY for a worker's https upstream
    tunnelled with CONNECT (trusted through SSL_CERT_FILE), the tunnel reused."""
    egress = tinyproxy()
    cert = certificates["loopback"]
    async with other_server(cert.server_context()) as tls:
        proxy = await proxy_process(
            {
                "HTTP_PROXY": egress.url,
                "HTTPS_PROXY": egress.url,
                "TOKEN_PROXY_UPSTREAM": tls.url,
                "SSL_CERT_FILE": str(cert.cert),
                "TOKEN_PROXY_WORKERS": "2",
            }
        )
        async with aiohttp.ClientSession() as session:
            for path in ("/a", "/b"):
                async with session.get(proxy.url + path) as response:
                    assert response.status == 200, await response.text()
        assert [r.raw_path for r in tls.requests] == ["/a", "/b"]
        assert egress.connects() == [f"127.0.0.1:{port_of(tls.url)}"]
        assert ("POST", token_server.url) in egress.requests()
    assert upstream.requests == []
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    started = [line for line in lines if line.get("event") == "token-proxy listening"]
    assert started
    for line in started:
        assert line["egress_proxy"] == {
            "credential default": f"{egress.url} (HTTP_PROXY)",
            "route /": f"{egress.url} (HTTPS_PROXY)",
        }


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("TOKEN_PROXY_OUTBOUND_PROXY", f"socks5://me:{PROXY_PASSWORD}@proxy:1080", "SOCKS"),
        ("TOKEN_PROXY_OUTBOUND_PROXY", f"http://me:{PROXY_PASSWORD}@proxy:port", "no valid port"),
        ("HTTPS_PROXY", f"https://me:{PROXY_PASSWORD}@proxy:443", "https:// egress proxy"),
    ],
)
async def test_a_bad_proxy_url_exits_2_naming_the_setting(
    clean_env: dict[str, str], tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """A proxy URL that cannot be used stops the proxy before it binds, with exit 2, the
    variable named, what to fix, and never the password."""
    env = check_env(clean_env, "http://127.0.0.1:9/token", **{variable: value})
    result = await run_cli_async(["run"], env, tmp_path)
    assert_config_error(result, f"environment variable {variable}: ", says)
    assert PROXY_PASSWORD not in result.stderr
