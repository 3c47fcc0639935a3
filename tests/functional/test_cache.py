"""The response cache (SPEC §10) through the whole proxy, against a loopback upstream that
counts what reaches it: hits, misses, RFC 9111's directives, validation, variants, credentials,
HEAD, the quota and the token it spares, bodies cut short, and the bound in bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.cache import ResponseCache
from proxy.config import Settings
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    app_of,
    manager_of,
    problem_of,
    wait_for,
)

TEAM_KEY_A = "team-key-alpha-5c1d9e7f3a2b4c6d"
TEAM_KEY_B = "team-key-bravo-8e2f4a6c0b1d3e5f"


class Clock:
    """The cache's clock, moved by the test: epoch seconds, starting now."""

    def __init__(self) -> None:
        self.now = float(int(__import__("time").time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Answers:
    """An upstream path whose answer a test sets (status, headers, body), counting requests;
    each body names the request that got it (`n`), so a stored one is known by it. Its Date
    is the cache's clock, as if the two clocks agreed."""

    def __init__(self, upstream: FakeUpstream, path: str, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self.status = 200
        self.headers: dict[str, str] = {"Cache-Control": "max-age=60"}
        self.not_modified_if: Callable[[web.Request], bool] | None = None
        self.seen: list[web.Request] = []
        upstream.handlers[path] = self.handle

    @property
    def count(self) -> int:
        return len(self.seen)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        headers = {"Date": http_date(self.clock.now), **self.headers}
        if self.not_modified_if is not None and self.not_modified_if(request):
            return web.Response(status=304, headers=headers)
        body = json.dumps({"n": self.count, "target": request.raw_path})
        return web.Response(
            status=self.status, text=body, content_type="application/json", headers=headers
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def cached_proxy(
    start_proxy: ProxyFactory, clock: Clock, settings: Settings | None = None, **overrides: Any
) -> Client:
    """A proxy with the cache on (unless told otherwise), whose cache runs on `clock`."""
    if settings is None:
        overrides.setdefault("cache", True)
    client = await start_proxy(settings, **overrides)
    cache = app_of(client).runtime.cache
    if cache is not None:
        cache.clock = clock
    return client


def cache_of(client: Client) -> ResponseCache:
    cache = app_of(client).runtime.cache
    assert cache is not None
    return cache


async def get(
    client: Client, path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
) -> tuple[int, CIMultiDict[str], bytes]:
    # Encoded as written: yarl would otherwise turn %7E into ~.
    url = URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)
    async with client.session.request(method, url, headers=headers) as response:
        body = await response.read()
        return response.status, CIMultiDict(response.headers), body


def served(body: bytes) -> int:
    """Which upstream request produced this body."""
    number: int = json.loads(body)["n"]
    return number


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


# --- hits and misses -----------------------------------------------------------------------------


async def test_a_fresh_answer_is_served_from_the_cache(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    status, headers, body = await get(client, "/item?id=1")
    assert (status, headers["X-Cache"], served(body)) == (200, "MISS", 1)
    clock.advance(7)
    status, headers, again = await get(client, "/item?id=1")
    assert (status, headers["X-Cache"], again) == (200, "HIT", body)
    assert headers["Age"] == "7"
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-ID"]
    assert answers.count == 1


async def test_the_cache_is_off_by_default(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await start_proxy()
    assert app_of(client).runtime.cache is None
    for _ in range(2):
        _, headers, _ = await get(client, "/item")
        assert "X-Cache" not in headers
    assert answers.count == 2


async def test_a_miss_is_keyed_by_the_url_byte_for_byte(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    targets = ["/item?a=1&b=2", "/item?b=2&a=1", "/item?a=%7E", "/item?a=~", "/item"]
    for target in targets:
        _, headers, _ = await get(client, target)
        assert headers["X-Cache"] == "MISS"
    assert answers.count == len(targets)
    for target in targets:
        _, headers, body = await get(client, target)
        assert headers["X-Cache"] == "HIT"
        assert json.loads(body)["target"] == target
    assert answers.count == len(targets)


async def test_a_route_overrides_the_global_cache_setting(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    clock: Clock,
) -> None:
    answers = Answers(upstream, "/item", clock)
    settings = Settings.model_validate(
        {
            "port": 0,
            "cache": True,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [
                {"prefix": "/on/", "upstream": upstream.url, "credential": "c"},
                {"prefix": "/off/", "upstream": upstream.url, "credential": "c", "cache": False},
            ],
        }
    )
    client = await cached_proxy(start_proxy, clock, settings)
    for _ in range(2):
        _, off, _ = await get(client, "/off/item")
        assert "X-Cache" not in off
    assert answers.count == 2
    for _ in range(2):
        await get(client, "/on/item")
    assert answers.count == 3


# --- what may be stored -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "control", ["no-store", "max-age=600, no-store", "no-store, max-age=600, private"]
)
async def test_no_store_is_never_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock, control: str
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": control, "ETag": '"v1"'}
    client = await cached_proxy(start_proxy, clock)
    for number in (1, 2):
        _, headers, body = await get(client, "/item")
        assert (headers["X-Cache"], served(body)) == ("BYPASS", number)
    assert len(cache_of(client).entries) == 0


async def test_private_and_answers_to_the_proxys_own_authorization_are_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    """The proxy is its credential's private cache: `private` does not stop it, and every
    request upstream carries the proxy's Authorization."""
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "private, max-age=60"}
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    _, headers, _ = await get(client, "/item")
    assert headers["X-Cache"] == "HIT"
    assert answers.count == 1
    assert answers.seen[0].headers["Authorization"].startswith("Bearer ")


async def test_s_maxage_is_ignored_and_nothing_is_fresh_by_heuristic(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    """s-maxage is for shared caches; an answer with only Last-Modified (a year old: a
    heuristic would call it fresh for weeks) is revalidated every time."""
    answers = Answers(upstream, "/token-price", clock)
    answers.headers = {
        "Cache-Control": "s-maxage=600",
        "Last-Modified": http_date(clock.now - 365 * 86400),
    }
    client = await cached_proxy(start_proxy, clock)
    for _ in range(3):
        await get(client, "/token-price")
    assert answers.count == 3
    # Every request after the first asked upstream whether it changed.
    assert [r.headers.get("If-Modified-Since") for r in answers.seen[1:]] == [
        answers.headers["Last-Modified"]
    ] * 2


async def test_an_answer_without_freshness_or_validator_is_not_kept(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {}
    client = await cached_proxy(start_proxy, clock)
    for _ in range(2):
        _, headers, _ = await get(client, "/item")
        assert headers["X-Cache"] == "BYPASS"
    assert answers.count == 2
    assert len(cache_of(client).entries) == 0


async def test_set_cookie_is_relayed_but_never_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    """The cache is shared by the team; a cookie is for the client that got it."""
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Set-Cookie": "session=first-client"}
    client = await cached_proxy(start_proxy, clock)
    _, first, _ = await get(client, "/item")
    assert first["Set-Cookie"] == "session=first-client"
    _, again, _ = await get(client, "/item")
    assert again["X-Cache"] == "HIT"
    assert "Set-Cookie" not in again


async def test_answers_above_the_entry_bound_stream_through_uncached(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    big = b"x" * 5000

    async def sized(request: web.Request) -> web.StreamResponse:
        if request.query.get("chunked"):
            response = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(big), 1000):
                await response.write(big[start : start + 1000])
            await response.write_eof()
            return response
        return web.Response(body=big, headers={"Cache-Control": "max-age=60"})

    upstream.handlers["/big"] = sized
    client = await cached_proxy(start_proxy, clock, cache_max_entry_bytes=4096)
    _, headers, body = await get(client, "/big")
    assert (headers["X-Cache"], body) == ("BYPASS", big)  # its Content-Length says so at once
    _, headers, body = await get(client, "/big?chunked=1")
    assert (headers["X-Cache"], body) == ("MISS", big)  # found out on the way: not kept
    assert len(cache_of(client).entries) == 0
    for target in ("/big", "/big?chunked=1"):
        _, headers, body = await get(client, target)
        assert headers["X-Cache"] != "HIT"
        assert body == big
    assert len(upstream.requests) == 4


# --- validation ---------------------------------------------------------------------------------


async def test_no_cache_answers_are_revalidated_each_time(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "no-cache, max-age=600", "ETag": '"v1"'}
    answers.not_modified_if = lambda request: request.headers.get("If-None-Match") == '"v1"'
    client = await cached_proxy(start_proxy, clock)
    _, headers, body = await get(client, "/item")
    assert headers["X-Cache"] == "MISS"
    for _ in range(2):
        status, headers, again = await get(client, "/item")
        assert (status, headers["X-Cache"], headers["Age"], again) == (
            200,
            "REVALIDATED",
            "0",
            body,
        )
    assert answers.count == 3


async def test_a_request_with_no_cache_revalidates_a_fresh_entry(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=600", "ETag": '"v1"'}
    answers.not_modified_if = lambda request: request.headers.get("If-None-Match") == '"v1"'
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    _, headers, _ = await get(client, "/item", {"Cache-Control": "no-cache"})
    assert headers["X-Cache"] == "REVALIDATED"
    clock.advance(1)
    _, headers, _ = await get(client, "/item", {"Cache-Control": "max-age=0"})
    assert headers["X-Cache"] == "REVALIDATED"
    _, headers, _ = await get(client, "/item")
    assert headers["X-Cache"] == "HIT"
    assert answers.count == 3


async def test_a_stale_entry_is_revalidated_by_etag_and_refreshed_by_the_304(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=10", "ETag": 'W/"v1"', "X-Version": "1"}
    client = await cached_proxy(start_proxy, clock)
    _, _, body = await get(client, "/item")
    clock.advance(11)
    # The 304 brings a longer lifetime and a new field; the body stays the stored one.
    answers.headers = {"Cache-Control": "max-age=100", "ETag": 'W/"v1"', "X-Version": "2"}
    answers.not_modified_if = lambda request: request.headers.get("If-None-Match") == 'W/"v1"'
    status, headers, again = await get(client, "/item")
    assert (status, headers["X-Cache"], headers["Age"], again) == (200, "REVALIDATED", "0", body)
    assert headers["X-Version"] == "2"
    assert answers.seen[1].headers["If-None-Match"] == 'W/"v1"'
    clock.advance(50)
    _, headers, again = await get(client, "/item")
    assert (headers["X-Cache"], headers["Age"], headers["X-Version"], again) == (
        "HIT",
        "50",
        "2",
        body,
    )
    assert answers.count == 2


async def test_a_stale_entry_is_revalidated_by_last_modified_and_replaced_when_changed(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    modified = http_date(clock.now - 3600)
    answers.headers = {"Cache-Control": "max-age=10", "Last-Modified": modified}
    answers.not_modified_if = lambda request: request.headers.get("If-Modified-Since") == modified
    client = await cached_proxy(start_proxy, clock)
    _, _, body = await get(client, "/item")
    clock.advance(20)
    _, headers, again = await get(client, "/item")
    assert (headers["X-Cache"], again) == ("REVALIDATED", body)
    clock.advance(20)
    # Changed upstream: the full answer replaces the entry.
    answers.not_modified_if = None
    answers.headers = {"Cache-Control": "max-age=10", "Last-Modified": http_date(clock.now)}
    _, headers, changed = await get(client, "/item")
    assert (headers["X-Cache"], served(changed)) == ("MISS", 3)
    _, headers, again = await get(client, "/item")
    assert (headers["X-Cache"], again) == ("HIT", changed)
    assert [r.headers.get("If-Modified-Since") for r in answers.seen] == [None, modified, modified]


async def test_age_counts_the_age_upstream_gave(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    """RFC 9111 §4.2.3: an answer 50 s old when it arrived, fresh for 60 s, is stale 10 s on."""
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Age": "50", "ETag": '"v1"'}
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    clock.advance(5)
    _, headers, _ = await get(client, "/item")
    assert (headers["X-Cache"], headers["Age"]) == ("HIT", "55")
    assert headers.get("Age") == "55"
    clock.advance(6)
    _, headers, _ = await get(client, "/item")
    assert headers["X-Cache"] == "MISS"  # stale, revalidated, answered in full
    assert answers.seen[1].headers["If-None-Match"] == '"v1"'


async def test_an_answer_dated_long_ago_is_stale_at_once(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Date": http_date(clock.now - 120)}
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    await get(client, "/item")
    assert answers.count == 2


# --- variants and credentials -------------------------------------------------------------------


async def test_vary_keeps_variants_apart(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Vary": "Accept-Language, Accept"}
    client = await cached_proxy(start_proxy, clock)
    en = {"Accept-Language": "en-US", "Accept": "application/json"}
    de = {"Accept-Language": "de-DE", "Accept": "application/json"}
    _, _, english = await get(client, "/item", en)
    _, _, german = await get(client, "/item", de)
    assert served(english) != served(german)
    # White space around commas does not make another variant (RFC 9111 §4.1).
    _, headers, again = await get(client, "/item", {**en, "Accept": "application/json"})
    assert (headers["X-Cache"], again) == ("HIT", english)
    _, headers, again = await get(client, "/item", de)
    assert (headers["X-Cache"], again) == ("HIT", german)
    _, headers, _ = await get(client, "/item", {"Accept": "application/json"})
    assert headers["X-Cache"] == "MISS"
    assert answers.count == 3


async def test_vary_star_never_matches(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Vary": "Accept, *"}
    client = await cached_proxy(start_proxy, clock)
    for _ in range(2):
        _, headers, _ = await get(client, "/item")
        assert headers["X-Cache"] == "BYPASS"
    assert answers.count == 2


def two_credentials(token_server: FakeTokenServer, upstream: FakeUpstream, **top: Any) -> Settings:
    """Credentials a and b (other client ids), routes /a/ and /b/ to the same upstream."""
    credentials = {
        name: {
            "client_id": f"{TEST_CLIENT_ID}-{name}",
            "client_secret": TEST_SECRET,
            "token_url": token_server.url,
        }
        for name in ("a", "b")
    }
    routes = [
        {"prefix": f"/{name}/", "upstream": upstream.url, "credential": name} for name in ("a", "b")
    ]
    return Settings.model_validate(
        {"port": 0, "cache": True, "credentials": credentials, "routes": routes, **top}
    )


async def test_two_credentials_never_share_an_entry(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    clock: Clock,
) -> None:
    """Both routes send the very same URL upstream, each with its own credential's token."""
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock, two_credentials(token_server, upstream))
    _, _, by_a = await get(client, "/a/item")
    _, headers, by_b = await get(client, "/b/item")
    assert (headers["X-Cache"], served(by_a), served(by_b)) == ("MISS", 1, 2)
    assert answers.seen[0].raw_path == answers.seen[1].raw_path
    tokens = {r.headers["Authorization"] for r in answers.seen}
    assert len(tokens) == 2
    for path, body in (("/a/item", by_a), ("/b/item", by_b)):
        _, headers, again = await get(client, path)
        assert (headers["X-Cache"], again) == ("HIT", body)
    assert answers.count == 2


async def test_vary_authorization_matches_within_a_credential_and_keys_never_enter(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    clock: Clock,
) -> None:
    """Two team clients, two keys: upstream saw the proxy's token both times, so the answer
    that varies on Authorization is the same one; no key and no token is in the cache."""
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "Vary": "Authorization"}
    settings = two_credentials(
        token_server,
        upstream,
        clients=[{"name": "alpha", "key": TEAM_KEY_A}, {"name": "bravo", "key": TEAM_KEY_B}],
    )
    client = await cached_proxy(start_proxy, clock, settings)
    _, _, body = await get(client, "/a/item", {"Authorization": f"Bearer {TEAM_KEY_A}"})
    _, headers, again = await get(client, "/a/item", {"Authorization": f"Bearer {TEAM_KEY_B}"})
    assert (headers["X-Cache"], again) == ("HIT", body)
    status, _, _ = await get(client, "/a/item")
    assert status == 401  # the key check comes before the cache
    assert answers.count == 1
    stored = repr([vars_of(entry) for entry in cache_of(client).entries._lru.values()])
    for secret in (TEAM_KEY_A, TEAM_KEY_B, *token_server.issued, TEST_SECRET):
        assert secret not in stored


def vars_of(entry: object) -> dict[str, object]:
    return {name: getattr(entry, name) for name in entry.__slots__}  # type: ignore[attr-defined]


# --- the client's own conditional requests, HEAD, unsafe methods -------------------------------


async def test_a_clients_conditional_request_is_answered_304_from_the_cache(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    modified = http_date(clock.now - 3600)
    answers.headers = {"Cache-Control": "max-age=60", "ETag": '"v1"', "Last-Modified": modified}
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    status, headers, body = await get(client, "/item", {"If-None-Match": 'W/"v0", "v1"'})
    assert (status, headers["X-Cache"], body) == (304, "HIT", b"")
    assert (headers["ETag"], headers["Cache-Control"]) == ('"v1"', "max-age=60")
    assert "Content-Type" not in headers
    status, headers, _ = await get(client, "/item", {"If-Modified-Since": modified})
    assert (status, headers["X-Cache"]) == (304, "HIT")
    # Validators that do not match get the whole answer, from the cache.
    status, headers, body = await get(client, "/item", {"If-None-Match": '"v0"'})
    assert (status, headers["X-Cache"], served(body)) == (200, "HIT", 1)
    earlier = http_date(clock.now - 7200)
    status, _, _ = await get(client, "/item", {"If-Modified-Since": earlier})
    assert status == 200
    assert answers.count == 1


async def test_a_clients_conditional_miss_fetches_the_whole_answer_to_store_it(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    """Upstream is asked without the client's validators; the client still gets its 304, and
    the next client its answer from the cache."""
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=60", "ETag": '"v1"'}
    client = await cached_proxy(start_proxy, clock)
    status, headers, body = await get(client, "/item", {"If-None-Match": '"v1"'})
    assert (status, headers["X-Cache"], body) == (304, "MISS", b"")
    assert answers.seen[0].headers.get("If-None-Match") is None
    await wait_for(lambda: len(cache_of(client).entries) == 1)
    status, headers, body = await get(client, "/item")
    assert (status, headers["X-Cache"], served(body)) == (200, "HIT", 1)
    assert answers.count == 1


async def test_head_is_answered_from_a_get_entry_and_from_its_own(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    _, _, body = await get(client, "/item")
    status, headers, empty = await get(client, "/item", method="HEAD")
    assert (status, headers["X-Cache"], empty) == (200, "HIT", b"")
    assert headers["Content-Length"] == str(len(body))
    assert answers.count == 1
    # A HEAD with no GET entry goes upstream as a HEAD, and its answer answers the next HEAD.
    _, headers, _ = await get(client, "/item?other", method="HEAD")
    assert headers["X-Cache"] == "MISS"
    _, headers, _ = await get(client, "/item?other", method="HEAD")
    assert headers["X-Cache"] == "HIT"
    assert [r.method for r in answers.seen] == ["GET", "HEAD"]
    # ...but never a GET.
    _, headers, body = await get(client, "/item?other")
    assert (headers["X-Cache"], served(body)) == ("MISS", 3)


async def test_unsafe_methods_bypass_and_forget_the_url(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    await get(client, "/item", method="HEAD")
    async with client.post("/item", data=b"{}") as response:
        assert response.headers["X-Cache"] == "BYPASS"
    _, headers, body = await get(client, "/item")
    assert (headers["X-Cache"], served(body)) == ("MISS", 3)
    # A failed one changes nothing (RFC 9111 §4.4).
    answers.status = 500
    async with client.delete("/item") as response:
        assert response.status == 500
    _, headers, _ = await get(client, "/item")
    assert headers["X-Cache"] == "HIT"


async def test_only_if_cached_without_an_entry_is_a_504(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    async with client.get("/item", headers={"Cache-Control": "only-if-cached"}) as response:
        problem = problem_of(504, response.content_type, await response.read())
    assert "only-if-cached" in problem["detail"]
    assert answers.count == 0
    await get(client, "/item")
    _, headers, _ = await get(client, "/item", {"Cache-Control": "only-if-cached"})
    assert headers["X-Cache"] == "HIT"


@pytest.mark.parametrize(
    "header", [("Range", "bytes=0-1"), ("If-Match", '"v1"'), ("Cache-Control", "no-store")]
)
async def test_requests_the_cache_does_not_answer_bypass_it(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock, header: tuple[str, str]
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    _, headers, _ = await get(client, "/item", dict([header]))
    assert headers["X-Cache"] == "BYPASS"
    assert answers.seen[1].headers[header[0]] == header[1]


# --- what a hit spares: quota, token, upstream ---------------------------------------------------


async def test_a_hit_spends_no_rate_limit_budget(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    settings = Settings.model_validate(
        {
            "port": 0,
            "cache": True,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                    "rate_limit": ["1/hour"],
                    "rate_limit_max_wait": 0,
                }
            },
            "routes": [{"prefix": "/", "upstream": upstream.url, "credential": "c"}],
        }
    )
    client = await cached_proxy(start_proxy, clock, settings)
    assert (await get(client, "/item"))[0] == 200
    for _ in range(20):
        status, headers, _ = await get(client, "/item")
        assert (status, headers["X-Cache"]) == (200, "HIT")
    status, _, _ = await get(client, "/other")  # the limit is spent: by the first request
    assert status == 429
    assert answers.count == 1


async def test_a_hit_is_served_while_the_token_endpoint_is_down(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream, clock: Clock
) -> None:
    Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock, token_wait_timeout=0.5)
    _, _, body = await get(client, "/item")
    # The token is dropped and every fetch of a new one fails.
    token_server.script = [web.Response(status=503, text="down")] * 1000
    manager = manager_of(client)
    token = manager.usable_token()
    assert token is not None
    manager.invalidate(token, path="/other", replayable=True)
    await wait_for(lambda: manager.usable_token() is None and len(token_server.script) < 1000)
    status, headers, again = await get(client, "/item")
    assert (status, headers["X-Cache"], again) == (200, "HIT", body)
    status, _, _ = await get(client, "/uncached")
    assert status == 503


# --- bodies that never arrive whole ---------------------------------------------------------


async def test_an_answer_upstream_breaks_off_is_not_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    calls = 0

    async def broken(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        response = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        response.content_length = 200_000
        await response.prepare(request)
        await response.write(b"x" * 100_000)
        assert request.transport is not None
        request.transport.close()
        return response

    upstream.handlers["/stream-broken"] = broken
    client = await cached_proxy(start_proxy, clock)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(client, "/stream-broken")
    assert calls == 2
    assert len(cache_of(client).entries) == 0


async def test_an_answer_the_client_hangs_up_on_is_not_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    more = asyncio.Event()
    ended: list[str] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        response.content_length = 4 * 65536
        await response.prepare(request)
        try:
            await response.write(b"x" * 65536)
            await asyncio.wait_for(more.wait(), 10)
            for _ in range(3):
                await response.write(b"x" * 65536)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            ended.append("cut")
            raise
        ended.append("whole")
        return response

    upstream.handlers["/stream-slow"] = slow
    client = await cached_proxy(start_proxy, clock)
    async with client.get("/stream-slow") as response:
        assert response.headers["X-Cache"] == "MISS"
        await response.content.readexactly(65536)
        response.close()  # the client hangs up with three quarters to come
    await wait_for(lambda: app_of(client).runtime._active == 0)
    more.set()
    await wait_for(lambda: bool(ended))
    assert len(cache_of(client).entries) == 0
    async with client.get("/stream-slow") as response:
        assert response.headers["X-Cache"] == "MISS"
        assert len(await response.read()) == 4 * 65536
    await wait_for(lambda: len(cache_of(client).entries) == 1)


# --- the bound in bytes, /-/ready and the metrics ------------------------------------------------


async def test_the_byte_bound_holds_and_ready_and_metrics_show_the_cache(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    client = await cached_proxy(start_proxy, clock, cache_max_bytes=64 * 1024)
    cache = cache_of(client)
    for number in range(300):
        await get(client, f"/item?n={number}")
        assert cache.entries.bytes <= 64 * 1024
    kept = len(cache.entries)
    assert 20 < kept < 300
    # The most recently used are kept, the oldest evicted.
    _, headers, _ = await get(client, "/item?n=299")
    assert headers["X-Cache"] == "HIT"
    _, headers, _ = await get(client, "/item?n=0")
    assert headers["X-Cache"] == "MISS"
    async with client.get("/-/ready") as response:
        shown = (await response.json())["cache"]
    assert shown == {
        "entries": len(cache.entries),
        "bytes": cache.entries.bytes,
        "max_bytes": 64 * 1024,
        "shared": False,
    }
    async with client.get("/-/metrics") as response:
        text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    route = ("route", "/")
    assert samples[("token_proxy_cache_requests_total", (("result", "HIT"), route))] == 1
    assert samples[("token_proxy_cache_requests_total", (("result", "MISS"), route))] == 301
    assert samples[("token_proxy_cache_evictions_total", ())] == 301 - len(cache.entries)
    assert samples[("token_proxy_cache_bytes", ())] == cache.entries.bytes
    assert samples[("token_proxy_cache_entries", ())] == len(cache.entries)
    assert answers.count == 301


async def test_a_stale_entry_is_kept_through_a_5xx_and_dropped_for_an_unstorable_answer(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item", clock)
    answers.headers = {"Cache-Control": "max-age=10", "ETag": '"v1"'}
    client = await cached_proxy(start_proxy, clock)
    await get(client, "/item")
    clock.advance(11)
    answers.status = 503
    answers.headers = {}
    status, headers, _ = await get(client, "/item")
    assert (status, headers["X-Cache"]) == (503, "BYPASS")
    assert len(cache_of(client).entries) == 1  # upstream failed: it will be asked again
    answers.status = 200
    answers.headers = {"Cache-Control": "no-store"}
    _, headers, body = await get(client, "/item")
    assert (headers["X-Cache"], served(body)) == ("BYPASS", 3)
    assert len(cache_of(client).entries) == 0
    assert [r.headers.get("If-None-Match") for r in answers.seen] == [None, '"v1"', '"v1"']
