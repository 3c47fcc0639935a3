"""Real HTTP clients (curl, requests, httpx, aiohttp) pointed at the proxy as their base URL,
as README's "Use it from your code" shows them: each gets upstream's answer, and upstream gets
the token the client never had."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from aiohttp.test_utils import TestServer

from docs import fake_provider
from proxy.config import Settings
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    StartProcess,
)
from tests.conftest import Client as ProxyClient

PATH = "/data/wow/token/index"
PARAMS = {"namespace": "dynamic-eu", "locale": "en_GB"}
EXPECTED_TARGET = f"{PATH}?namespace=dynamic-eu&locale=en_GB"
TEAM_KEY = "client-test-team-key-5d1c9e7a20b4"
CURL = shutil.which("curl")


def assert_served(
    body: dict[str, Any], token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """The client got upstream's answer to its exact request, which carried the proxy's token
    in place of anything the client sent."""
    assert body["path"] == EXPECTED_TARGET
    assert len(upstream.requests) == 1
    arrived = upstream.requests[0]
    assert arrived.raw_path == EXPECTED_TARGET
    assert arrived.header("Authorization") == f"Bearer {token_server.issued[-1]}"
    assert TEAM_KEY not in json.dumps(arrived.headers)


async def run_curl(*args: str) -> tuple[int, bytes]:
    """curl's exit status and what it printed."""
    assert CURL is not None
    process = await asyncio.create_subprocess_exec(
        CURL,
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    return process.returncode, stdout


def base_url_of(proxy: ProxyClient) -> str:
    """The in-process proxy's URL, as a client's base URL: http://127.0.0.1:<port>."""
    return str(proxy.make_url("/")).rstrip("/")


def team_config(tmp_path: Path) -> dict[str, str]:
    """Environment for a proxy process in team mode, with one client holding TEAM_KEY."""
    config = tmp_path / "team.toml"
    config.write_text(f'[[clients]]\nname = "app"\nkey = "{TEAM_KEY}"\n', encoding="utf-8")
    return {"TOKEN_PROXY_CONFIG": str(config)}


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """`curl 'localhost:8080/data/wow/token/index?namespace=...&locale=...'` gets the answer."""
    proxy = await start_proxy()
    _, stdout = await run_curl(base_url_of(proxy) + EXPECTED_TARGET)
    assert_served(json.loads(stdout), token_server, upstream)


def requests_get(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """README's requests example: a Session, the proxy's URL as the base of every path."""
    with requests.Session() as session:
        session.headers.update(headers or {})
        response = session.get(f"{base_url}{PATH}", params=PARAMS, timeout=10)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


async def test_requests(
    proxy_process: StartProcess, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """requests.Session with the proxy's URL as base and params for namespace and locale."""
    proxy = await proxy_process()
    body = await asyncio.to_thread(requests_get, proxy.url)
    assert_served(body, token_server, upstream)


def httpx_get(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """README's httpx example: Client(base_url=...) and relative paths."""
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        response = client.get(PATH, params=PARAMS)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


async def test_httpx(
    proxy_process: StartProcess, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """httpx.Client(base_url=<proxy>) with params for namespace and locale."""
    proxy = await proxy_process()
    body = await asyncio.to_thread(httpx_get, proxy.url)
    assert_served(body, token_server, upstream)


async def test_httpx_async(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """httpx.AsyncClient(base_url=<proxy>) likewise, from async code."""
    proxy = await start_proxy()
    async with httpx.AsyncClient(base_url=base_url_of(proxy), timeout=10) as client:
        response = await client.get(PATH, params=PARAMS)
        response.raise_for_status()
        body = response.json()
    assert_served(body, token_server, upstream)


async def aiohttp_get(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """README's aiohttp example: ClientSession(base_url=...) and relative paths."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(base_url=base_url, headers=headers, timeout=timeout) as session,
        session.get(PATH, params=PARAMS) as response,
    ):
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def test_aiohttp(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """aiohttp.ClientSession(base_url=<proxy>) with params for namespace and locale."""
    proxy = await start_proxy()
    body = await aiohttp_get(base_url_of(proxy))
    assert_served(body, token_server, upstream)


async def test_every_client_with_a_team_key(
    proxy_process: StartProcess,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    """In team mode each client sends its key as a default `Authorization: Bearer` header;
    the proxy swaps it for the upstream token, and without it answers 401."""
    proxy = await proxy_process(team_config(tmp_path))
    key = {"Authorization": f"Bearer {TEAM_KEY}"}
    calls: list[Callable[[], Awaitable[dict[str, Any]]]] = [
        lambda: asyncio.to_thread(requests_get, proxy.url, key),
        lambda: asyncio.to_thread(httpx_get, proxy.url, key),
        lambda: aiohttp_get(proxy.url, key),
    ]
    if CURL is not None:

        async def curl_get() -> dict[str, Any]:
            _, stdout = await run_curl(
                "--header", f"Authorization: Bearer {TEAM_KEY}", proxy.url + EXPECTED_TARGET
            )
            body: dict[str, Any] = json.loads(stdout)
            return body

        calls.append(curl_get)
    for call in calls:
        upstream.requests.clear()
        assert_served(await call(), token_server, upstream)

    upstream.requests.clear()
    with pytest.raises(httpx.HTTPStatusError) as refused:
        await asyncio.to_thread(httpx_get, proxy.url)
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["Content-Type"].startswith("application/problem+json")
    assert upstream.requests == []


async def test_walkthrough_fake_provider(start_proxy: ProxyFactory) -> None:
    """README's newcomer walkthrough: docs/fake_provider.py stands in for Battle.net, and
    `curl 'localhost:8080/data/wow/token/index?namespace=dynamic-us'` through the proxy gets
    the price; a static namespace gets the fake's 404, and /-/ready reports the token."""
    server = TestServer(fake_provider.create_app(), host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("/")).rstrip("/")
        proxy = await start_proxy(
            Settings.model_validate(
                {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": f"{base}/token",
                    "upstream": base,
                    "port": 0,
                }
            )
        )
        url = base_url_of(proxy)
        async with aiohttp.ClientSession(base_url=url) as session:
            async with session.get(PATH, params={"namespace": "dynamic-us"}) as response:
                assert response.status == 200
                assert (await response.json())["price"] > 0
            async with session.get(PATH, params={"namespace": "static-us"}) as response:
                assert response.status == 404
            async with session.get("/-/ready") as response:
                assert response.status == 200
        if CURL is not None:
            _, stdout = await run_curl(f"{url}{PATH}?namespace=dynamic-us")
            assert json.loads(stdout)["_links"]["self"]["href"].startswith("https://us.api.")
    finally:
        await server.close()
