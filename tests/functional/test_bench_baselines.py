"""bench/run's baselines, the reference proxy (case c) and the no-feature ceiling (case f), as
real processes: each relays a request and its answer with the static token, so that a change
to the lean client they share cannot break the benchmark unnoticed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FakeUpstream, free_port

BENCH = Path(__file__).resolve().parents[2] / "bench"


async def _answer(url: str, deadline: float) -> aiohttp.ClientResponse | None:
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            try:
                response = await session.post(url, data=b"twelve bytes")
                await response.read()
                return response
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    return None


@pytest.mark.parametrize("script", ["reference_proxy.py", "ceiling_proxy.py"])
async def test_baseline_relays_with_the_static_token(
    script: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "baseline.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--port", str(port), "--upstream", upstream.url],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 15
        response = await _answer(f"http://127.0.0.1:{port}/data/x?namespace=static-eu", deadline)
        assert response is not None, (tmp_path / "baseline.log").read_text()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        (arrived,) = upstream.requests
        assert arrived.raw_path == "/data/x?namespace=static-eu"
        assert arrived.header("Authorization") == "Bearer static"
        assert arrived.body == b"twelve bytes"
    finally:
        process.terminate()
        process.wait(10)
        log.close()
