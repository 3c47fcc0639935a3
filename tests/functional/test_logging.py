"""Logs of a real proxy process: one access line per request, and no secret or token ever."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
from aiohttp import web

from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    StartProcess,
    wait_for,
)


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_access_line_per_request(proxy_process: StartProcess, upstream: FakeUpstream) -> None:
    """Each forwarded request logs one line with method, route, status, timings, bytes, id."""
    proxy = await proxy_process()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/echo?x=1", data=b"12345", headers={"X-Request-ID": "req-abc"}
        ) as response,
    ):
        assert response.status == 200
        await response.read()
    assert proxy.stop() == 0
    access = [
        line for line in _json_lines(proxy.log_text()) if line.get("logger") == "proxy.access"
    ]
    assert len(access) == 1
    line = access[0]
    assert line["method"] == "POST"
    assert line["route"] == "/"
    assert line["status"] == 200
    assert line["request_id"] == "req-abc"
    assert line["bytes_in"] == 5
    assert isinstance(line["bytes_out"], int)
    assert line["bytes_out"] > 0
    assert isinstance(line["duration_ms"], float)
    assert isinstance(line["upstream_ms"], float)


async def test_secret_and_tokens_never_logged(
    proxy_process: StartProcess, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """At debug level, through refreshes, errors and 401 replays, no secret or token is logged."""
    token_server.expires_in = 2
    first_token: list[str] = []

    async def reject_first(request: web.Request) -> web.Response:
        if not first_token:
            first_token.append(request.headers["Authorization"])
        if request.headers["Authorization"] == first_token[0]:
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({"ok": True})

    upstream.handlers["/replay"] = reject_first
    proxy = await proxy_process()
    # The next refresh fails with a description that echoes the secret back.
    token_server.script.append(
        web.json_response(
            {"error": "invalid_request", "error_description": f"bad secret {TEST_SECRET}"},
            status=400,
        )
    )
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {TEST_SECRET}"}
        async with session.get(proxy.url + "/replay", headers=headers) as response:
            assert response.status == 200
        await wait_for(lambda: len(token_server.requests) >= 4, timeout=15)
        async with session.get(proxy.url + "/after") as response:
            assert response.status == 200
        await asyncio.sleep(0)
    assert proxy.stop() == 0
    text = proxy.log_text()
    assert "token request failed" in text
    assert "upstream answered 401" in text
    basic = base64.b64encode(f"{TEST_CLIENT_ID}:{TEST_SECRET}".encode()).decode()
    assert TEST_SECRET not in text
    assert basic not in text
    assert token_server.issued
    for token in token_server.issued:
        assert token not in text
