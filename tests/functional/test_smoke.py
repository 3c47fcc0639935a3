"""The proxy end to end against the fake token server and fake upstream."""

from __future__ import annotations

from tests.conftest import FakeTokenServer, FakeUpstream, ProxyFactory


async def test_forwards_with_bearer_token(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A plain GET arrives upstream with the issued token and the client gets the answer."""
    client = await start_proxy()
    response = await client.get("/data/wow/token/index?namespace=dynamic-us&locale=en_US")
    assert response.status == 200
    body = await response.json()
    assert body["path"] == "/data/wow/token/index?namespace=dynamic-us&locale=en_US"
    assert upstream.requests[0].header("Authorization") == f"Bearer {token_server.issued[0]}"
