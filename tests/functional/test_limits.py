"""Limits on concurrent upstream connections: per route, and for the whole upstream pool; and
the transports built per route profile."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import Settings
from proxy.errors import UpstreamBusy
from proxy.transport import Transports
from proxy.transport.slots import ConnectionSlots
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    wait_for,
)


class Held:
    """An upstream handler that keeps each request until `release()` returns, counting how
    many are upstream at once (`active`) and the most there ever were (`peak`)."""

    def __init__(self, release: Callable[[], Awaitable[object]]) -> None:
        self._release = release
        self.active = 0
        self.peak = 0

    async def __call__(self, request: web.Request) -> web.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.wait_for(self._release(), 10)
        finally:
            self.active -= 1
        return web.json_response({"ok": True})


def one_route(
    token_server: FakeTokenServer, upstream: FakeUpstream, route: dict[str, Any], **top: Any
) -> Settings:
    """Settings with credential c and one route "/" to `upstream` (plus `route`'s keys)."""
    return Settings.model_validate(
        {
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [{"prefix": "/", "upstream": upstream.url, "credential": "c", **route}],
            **top,
        }
    )


def self_signed_ca() -> bytes:
    """A CA certificate in PEM, for a route's ca_bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-proxy test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_route_connection_limit(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A route with max_connections = 2 never has more than 2 requests upstream at once; a
    request that waits longer than connect_timeout gets 503 problem+json with Retry-After."""
    release = asyncio.Event()
    held = Held(release.wait)
    upstream.handlers["/held"] = held
    settings = one_route(token_server, upstream, {"max_connections": 2}, connect_timeout=0.3)
    client = await start_proxy(settings)
    first = [asyncio.create_task(client.get("/held")) for _ in range(2)]
    await wait_for(lambda: held.active == 2)
    refused = await client.get("/held")
    assert refused.status == 503
    assert refused.content_type == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert "max_connections" in (await refused.json())["detail"]
    release.set()
    for task in first:
        response = await task
        assert response.status == 200
        response.release()
    burst = await asyncio.gather(*(client.get("/held") for _ in range(6)))
    assert [response.status for response in burst] == [200] * 6
    assert held.peak == 2


async def test_upstream_connection_pool_limit(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """max_connections bounds the whole upstream pool: extra requests wait for a connection
    and get the next one freed, one that waits longer than connect_timeout gets 503 with
    Retry-After (as a route's own cap gives), and a client that gives up while waiting takes
    no connection with it."""
    releases: asyncio.Queue[None] = asyncio.Queue()
    held = Held(releases.get)
    upstream.handlers["/held"] = held
    settings = one_route(token_server, upstream, {}, max_connections=2, connect_timeout=0.5)
    client = await start_proxy(settings)
    tasks = [asyncio.create_task(client.get("/held")) for _ in range(2)]
    await wait_for(lambda: held.active == 2)
    # A client that gives up while its request waits for a connection.
    with contextlib.suppress(TimeoutError):
        await client.get("/held", timeout=aiohttp.ClientTimeout(total=0.1))
    refused = await client.get("/held")
    assert refused.status == 503
    assert refused.content_type == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert "raise max_connections" in (await refused.json())["detail"]
    # One at a time: each freed connection goes to a waiting request, never to two, while
    # newcomers keep arriving.
    tasks += [asyncio.create_task(client.get("/held")) for _ in range(2)]
    for served in range(1, 5):
        releases.put_nowait(None)
        tasks.append(asyncio.create_task(client.get("/held")))
        await wait_for(lambda: held.active == 2 and releases.empty())
        assert sum(task.done() for task in tasks) == served
    for _ in range(4):
        releases.put_nowait(None)
    assert [(await task).status for task in tasks] == [200] * 8
    assert held.peak == 2


async def test_the_pool_counts_the_connections_of_capped_routes_too(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """max_connections is the pool's in all: connections a route with a cap of its own has in
    use count against it, so another route finds the pool full."""
    release = asyncio.Event()
    held = Held(release.wait)
    upstream.handlers["/held"] = held
    settings = Settings.model_validate(
        {
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [
                {
                    "prefix": "/capped/",
                    "upstream": upstream.url,
                    "credential": "c",
                    "max_connections": 2,
                },
                {"prefix": "/", "upstream": upstream.url, "credential": "c"},
            ],
            "max_connections": 2,
            "connect_timeout": 0.3,
        }
    )
    client = await start_proxy(settings)
    first = [asyncio.create_task(client.get("/capped/held")) for _ in range(2)]
    await wait_for(lambda: held.active == 2)
    refused = await client.get("/held")
    assert refused.status == 503
    assert "raise max_connections" in (await refused.json())["detail"]
    release.set()
    assert [(await task).status for task in first] == [200, 200]
    assert (await client.get("/held")).status == 200


def test_routes_of_one_profile_share_one_transport(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """One transport per route profile, as httpx mounts them: routes alike share one; a CA
    bundle of its own, or a cap of its own (even the same number as another route's), gives a
    route its own."""
    ca_bundle = tmp_path / "ca.pem"
    ca_bundle.write_bytes(self_signed_ca())

    def route(prefix: str, **extra: Any) -> dict[str, Any]:
        return {"prefix": prefix, "upstream": upstream.url, "credential": "c", **extra}

    settings = Settings.model_validate(
        {
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [
                route("/a/"),
                route("/b/"),
                route("/ca/", ca_bundle=str(ca_bundle)),
                route("/ca2/", ca_bundle=str(ca_bundle)),
                route("/cap1/", max_connections=3),
                route("/cap2/", max_connections=3),
            ],
        }
    )
    transports = Transports.from_settings(settings)
    of = {route.prefix: transports.for_route(route) for route in settings.routes}
    assert of["/a/"] is of["/b/"]
    assert of["/ca/"] is of["/ca2/"]
    assert of["/ca/"] is not of["/a/"]
    assert len({id(of["/cap1/"]), id(of["/cap2/"]), id(of["/a/"])}) == 3


async def test_a_route_slot_is_given_back_when_its_wait_for_the_pool_ends() -> None:
    """A route's slot taken while the pool is full goes back when the wait for the pool times
    out, and the refusal names the pool's max_connections, not the route's."""
    pool = ConnectionSlots.for_pool(1, wait=0.05)
    route = ConnectionSlots.for_route("/r/", 2, wait=0.05, parent=pool)
    assert pool.try_take()
    with pytest.raises(UpstreamBusy, match=r"raise max_connections$"):
        await route.take()
    assert (route.free, pool.waiting) == (2, 0)
    pool.give()
    assert route.try_take()
    assert (route.free, pool.free) == (1, 0)
