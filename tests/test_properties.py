"""Property-based tests (hypothesis): request targets round-trip byte for byte through the route
table and through the running proxy, dot segments are refused exactly when they climb, and
end-to-end headers survive the header hygiene of both directions unchanged and in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import ProxyApp
from proxy.config import Route, Settings
from proxy.errors import BadRequest
from proxy.headers import HOP_BY_HOP, downstream_headers, upstream_headers
from proxy.routing import RouteTable
from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    ProxyTestServer,
)

# --- strategies --------------------------------------------------------------------------------

# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;="
PCHAR = UNRESERVED + SUB_DELIMS + ":@"
# RFC 9110 5.6.2: token = 1*tchar
TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
VISIBLE = "".join(chr(code) for code in range(0x21, 0x7F))


def _percent(byte_and_case: tuple[int, bool]) -> str:
    byte, upper = byte_and_case
    return f"%{byte:02X}" if upper else f"%{byte:02x}"


percent_encoded = st.tuples(st.integers(0, 255), st.booleans()).map(_percent)
pchar = st.one_of(st.sampled_from(PCHAR), percent_encoded)
dot_segment = st.sampled_from([".", "..", "%2e%2e", "%2E%2E", ".%2e", "%2E.", "%2e"])
segment = st.one_of(
    st.lists(pchar, max_size=8).map("".join),
    dot_segment,
)
query = st.one_of(
    st.none(),
    st.lists(st.one_of(pchar, st.sampled_from("/?")), max_size=16).map("".join),
)


def climbs(path: str) -> bool:
    """The reference: does any '..' segment (raw or percent-encoded) climb above the start?"""
    depth = 0
    for part in path.split("/"):
        plain = part.lower().replace("%2e", ".")
        if plain == "..":
            depth -= 1
            if depth < 0:
                return True
        elif plain not in {"", "."}:
            depth += 1
    return False


any_path = st.lists(segment, max_size=8).map(lambda parts: "/" + "/".join(parts))
safe_path = any_path.filter(lambda path: not climbs(path))


Pairs = list[tuple[str, str]]


def header_pairs(excluded: frozenset[str], *, unique: bool = False) -> st.SearchStrategy[Pairs]:
    """Header lists of token names (none of `excluded`, in any case) and visible-ASCII values."""
    name = st.text(TCHAR, min_size=1, max_size=16).filter(lambda n: n.lower() not in excluded)
    value = st.text(VISIBLE + " ", max_size=24).map(str.strip)
    pairs = st.lists(st.tuples(name, value), max_size=12)
    if unique:
        pairs = st.lists(
            st.tuples(name, value), max_size=12, unique_by=lambda pair: pair[0].lower()
        )
    return pairs


UPSTREAM_EXCLUDED = HOP_BY_HOP | {
    "host",
    "authorization",
    "expect",
    "content-length",
    "transfer-encoding",
    "x-request-id",
}
DOWNSTREAM_EXCLUDED = HOP_BY_HOP | {"x-request-id"}


def multidict(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    built: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        built.add(name, value)
    return CIMultiDictProxy(built)


# --- the route table ---------------------------------------------------------------------------

BASES = {
    "/": "http://127.0.0.1:9/root",
    "/eu/": "http://127.0.0.1:9/v2/",
    "/eu/special/": "https://api.example.com",
    "/a/b/": "http://[::1]:9/deep/base",
    "/v1": "http://localhost:9",
}
TABLE = RouteTable(
    [Route(prefix=prefix, upstream=base, credential="c") for prefix, base in BASES.items()]
)


def expected_route(path: str) -> str:
    """The reference: the longest configured prefix that matches whole segments of path."""
    matching = [
        prefix
        for prefix in BASES
        if path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/")
    ]
    return max(matching, key=lambda prefix: len(prefix.rstrip("/")))


@settings(max_examples=300)
@given(prefix=st.sampled_from(sorted(BASES)), path=safe_path, query=query)
def test_route_table_keeps_path_and_query_byte_for_byte(
    prefix: str, path: str, query: str | None
) -> None:
    """Under any prefix, a path of pchar and percent-encodings that does not climb, and any
    query, reach the upstream target exactly as sent, after the chosen prefix is swapped for
    the upstream base."""
    full = prefix.rstrip("/") + path
    target = full + ("" if query is None else "?" + query)
    chosen = expected_route(full)
    match = TABLE.match(target)
    assert match.route.prefix == chosen
    rest = full[len(chosen.rstrip("/")) :]
    assert match.target == BASES[chosen].rstrip("/") + rest + ("" if query is None else "?" + query)


@settings(max_examples=300)
@given(path=any_path, query=query)
def test_route_table_refuses_exactly_the_paths_that_climb(path: str, query: str | None) -> None:
    """A path is refused with BadRequest if and only if a '..' segment climbs above its prefix;
    the query never matters."""
    target = "/eu" + path + ("" if query is None else "?" + query)
    if climbs(path):
        try:
            TABLE.match(target)
        except BadRequest:
            return
        raise AssertionError(f"{target!r} climbs above /eu/ but was accepted")
    assert TABLE.match(target).route.prefix in {"/eu/", "/eu/special/"}


# --- header hygiene ----------------------------------------------------------------------------


@given(pairs=header_pairs(UPSTREAM_EXCLUDED))
def test_upstream_headers_keep_end_to_end_headers_exactly(pairs: list[tuple[str, str]]) -> None:
    """Any set of end-to-end request headers passes upstream with the same names, values and
    order, followed only by the token's Authorization and the request id."""
    out = upstream_headers(multidict(pairs).items(), token="tok-xyz-123", request_id="rid-1")
    assert out == [
        *pairs,
        ("Authorization", "Bearer tok-xyz-123"),
        ("X-Request-ID", "rid-1"),
    ]


@given(pairs=header_pairs(DOWNSTREAM_EXCLUDED))
def test_downstream_headers_keep_end_to_end_headers_exactly(
    pairs: list[tuple[str, str]],
) -> None:
    """Any set of end-to-end response headers reaches the client with the same names, values
    and order, followed only by the request id."""
    out = downstream_headers(multidict(pairs).items(), request_id="rid-2")
    assert out == [*pairs, ("X-Request-ID", "rid-2")]


@given(
    pairs=header_pairs(UPSTREAM_EXCLUDED),
    hops=st.lists(
        st.tuples(
            st.sampled_from(sorted(HOP_BY_HOP | {"Host", "Authorization", "Expect"})),
            st.text(VISIBLE, max_size=8),
        ),
        max_size=6,
    ),
    named=st.data(),
)
def test_upstream_headers_drop_hop_by_hop_and_connection_named_headers_only(
    pairs: list[tuple[str, str]], hops: list[tuple[str, str]], named: st.DataObject
) -> None:
    """Mixed in anywhere, hop-by-hop headers, Host, Authorization, Expect and the headers a
    Connection header names are dropped, and the other end-to-end headers keep their order."""
    names = sorted({name.lower() for name, _ in pairs})
    dropped = named.draw(st.sets(st.sampled_from(names)) if names else st.just(set[str]()))
    mixed = list(pairs)
    for index, hop in enumerate(hops):
        mixed.insert(named.draw(st.integers(0, len(mixed)), label=f"position {index}"), hop)
    mixed.append(("Connection", ", ".join(sorted(dropped)) or "keep-alive"))
    out = upstream_headers(multidict(mixed).items(), token="tok-abc-456", request_id="rid-3")
    # A Connection header among the hops names headers to drop as well.
    dropped |= {
        part.strip().lower()
        for name, value in hops
        if name.lower() == "connection"
        for part in value.split(",")
    }
    kept = [(name, value) for name, value in pairs if name.lower() not in dropped]
    assert out == [
        *kept,
        ("Authorization", "Bearer tok-abc-456"),
        ("X-Request-ID", "rid-3"),
    ]


# --- the running proxy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request: its target and end-to-end headers, and where it must arrive."""

    target: str
    headers: list[tuple[str, str]]
    expected_path: str


PROXY_BASES = {"/": "/root", "/eu/": "/v2"}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    prefix = draw(st.sampled_from(sorted(PROXY_BASES)))
    path = draw(safe_path.filter(lambda p: not p.startswith("/-/")))
    full = prefix.rstrip("/") + path
    if full == "/-" or full.startswith("/-/"):
        full = "/x" + full
    # aiohttp's client drops an empty query (a bare '?'): test_empty_query_is_kept, xfail.
    q = draw(query.filter(lambda value: value != ""))
    suffix = "" if q is None else "?" + q
    chosen = "/eu/" if full == "/eu" or full.startswith("/eu/") else "/"
    rest = full[len(chosen.rstrip("/")) :]
    headers = draw(header_pairs(UPSTREAM_EXCLUDED | {"connection"}, unique=True))
    return Case(full + suffix, headers, PROXY_BASES[chosen] + rest + suffix)


async def send(port: int, case: Case) -> bytes:
    """One request on a raw connection, exactly as the case says; the whole answer."""
    lines = [f"GET {case.target} HTTP/1.1", "Host: proxy.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in case.headers]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def through_the_proxy(batch: list[Case]) -> None:
    token_server, upstream = FakeTokenServer(), FakeUpstream()
    token_app, upstream_app = web.Application(), web.Application()
    token_app.router.add_post("/token", token_server.handle)
    # [\s\S], not ".": a decoded path may hold a newline (%0a), which "." would not match.
    upstream_app.router.add_route("*", r"/{tail:[\s\S]*}", upstream.handle)
    servers: list[BaseTestServer] = [
        TestServer(token_app, host="127.0.0.1"),
        TestServer(upstream_app, host="127.0.0.1"),
    ]
    for server in servers:
        await server.start_server()
    token_url = str(servers[0].make_url("/token"))
    upstream_url = str(servers[1].make_url("/")).rstrip("/")
    proxy_settings = Settings.model_validate(
        {
            "port": 0,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_url,
                }
            },
            "routes": [
                {"prefix": prefix, "upstream": upstream_url + base, "credential": "c"}
                for prefix, base in PROXY_BASES.items()
            ],
        }
    )
    proxy = ProxyTestServer(ProxyApp(proxy_settings))
    servers.append(proxy)
    try:
        await proxy.start_server()
        assert proxy.port is not None
        for case in batch:
            answer = await send(proxy.port, case)
            status = int(answer.split(b" ", 2)[1])
            assert status == 200, (case, answer[:400])
            seen = upstream.requests[-1]
            assert seen.raw_path == case.expected_path
            arrived = [
                (name, value)
                for name, value in seen.headers
                if name.lower() not in {"host", "authorization", "x-request-id"}
            ]
            assert arrived == case.headers
        assert len(upstream.requests) == len(batch)
    finally:
        for server in reversed(servers):
            await server.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(batch=st.lists(cases(), min_size=1, max_size=6))
# aiohttp's parser names the headers it knows its own way (CONTENT-TYPE as Content-Type): the
# names still reach upstream as the client wrote them.
@example(batch=[Case("/x", [("CONTENT-TYPE", "a"), ("accept-LANGUAGE", "b")], "/root/x")])
def test_random_requests_arrive_upstream_exactly_and_never_fail(batch: list[Case]) -> None:
    """Random paths, queries and end-to-end headers pass through the running proxy: never a
    500 nor a logged exception, and upstream receives the target and headers exactly."""
    start = len(LEAKS.log.getvalue())
    asyncio.run(through_the_proxy(batch))
    logged = [
        json.loads(line)
        for line in LEAKS.log.getvalue()[start:].splitlines()
        if line.startswith("{")
    ]
    problems = [line for line in logged if "exception" in line or line["level"] == "error"]
    assert problems == []
