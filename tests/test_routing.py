"""Unit tests of the route table and of the header hygiene applied in both directions."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy import headers as hygiene
from proxy.config import Route
from proxy.errors import BadRequest, NoRoute
from proxy.routing import RouteTable

TOKEN = "tok-upstream-123"
REQUEST_ID = "req-42"


def route(prefix: str, upstream: str, credential: str = "c") -> Route:
    return Route(prefix=prefix, upstream=upstream, credential=credential)


def headers(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return list(pairs)


def upstream_headers(
    incoming: list[tuple[str, str]], *, token: str, request_id: str
) -> CIMultiDict[str]:
    """hygiene.upstream_headers, its pairs in a multidict for the assertions."""
    return CIMultiDict(hygiene.upstream_headers(incoming, token=token, request_id=request_id))


def downstream_headers(incoming: list[tuple[str, str]], *, request_id: str) -> CIMultiDict[str]:
    return CIMultiDict(hygiene.downstream_headers(incoming, request_id=request_id))


def names(result: CIMultiDict[str]) -> set[str]:
    return {name.lower() for name in result}


# --- RouteTable ------------------------------------------------------------------------------


def test_prefix_is_stripped_and_joined_to_the_upstream_base_path() -> None:
    """Prefix /eu/ with upstream http://h/v2 sends /eu/foo?x=1 to http://h/v2/foo?x=1."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2")])
    match = table.match("/eu/foo?x=1")
    assert match.target == "http://127.0.0.1:9/v2/foo?x=1"
    assert match.route.prefix == "/eu/"


def test_trailing_slash_of_the_upstream_base_is_not_doubled() -> None:
    """An upstream base ending in '/' joins to the rest of the path with a single slash."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2/")])
    assert table.match("/eu/foo").target == "http://127.0.0.1:9/v2/foo"


def test_root_route_forwards_the_whole_path() -> None:
    """The root route '/' keeps the whole path and query, unchanged."""
    table = RouteTable([route("/", "http://127.0.0.1:9")])
    assert table.match("/a/b?c=d").target == "http://127.0.0.1:9/a/b?c=d"


def test_prefix_without_trailing_path_maps_to_the_upstream_base() -> None:
    """The prefix itself without its trailing slash (/eu) reaches the upstream base path."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2")])
    assert table.match("/eu?x=1").target == "http://127.0.0.1:9/v2?x=1"


def test_longest_prefix_wins_whatever_the_configured_order() -> None:
    """Routes are tried longest prefix first, not in the order they were configured."""
    table = RouteTable(
        [
            route("/", "http://127.0.0.1:9/root", "a"),
            route("/eu/", "http://127.0.0.1:9/v2", "b"),
            route("/eu/special/", "http://127.0.0.1:9/v3", "c"),
        ]
    )
    assert table.match("/eu/special/x").target == "http://127.0.0.1:9/v3/x"
    assert table.match("/eu/special/x").route.credential == "c"
    assert table.match("/eu/x").target == "http://127.0.0.1:9/v2/x"
    assert table.match("/other").target == "http://127.0.0.1:9/root/other"


def test_prefix_matches_whole_segments_only() -> None:
    """Prefix /eu/ does not match /europe/x, which falls through to the next route."""
    table = RouteTable(
        [route("/eu/", "http://127.0.0.1:9/v2", "a"), route("/", "http://127.0.0.1:9/r", "b")]
    )
    assert table.match("/europe/x").target == "http://127.0.0.1:9/r/europe/x"


def test_no_matching_route_raises_no_route() -> None:
    """A path under no configured prefix is refused with NoRoute (404)."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2")])
    with pytest.raises(NoRoute) as caught:
        table.match("/us/foo")
    assert caught.value.status == 404


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/%E2%9C%93?x=1&x=2",
        "/%e2%9c%93/lower-case-escapes",
        "//double//slash//",
        "/semi;colon=1/x;y?z",
        "/sub-delims/!$&'()*+,;=:@?q=a+b&e=&n&s=%20&sl=/x/../y",
        "/tilde/~user/%7Euser",
        "/dot/./segment/",
        "/a/b/../c",
        "/q?only=..%2F..%2F",
        "/search?",
    ],
)
def test_path_and_query_are_kept_byte_for_byte(target: str) -> None:
    """Odd but legal targets reach the upstream without re-encoding or normalisation."""
    table = RouteTable([route("/", "http://127.0.0.1:9/base")])
    assert table.match(target).target == "http://127.0.0.1:9/base" + target


@pytest.mark.parametrize(
    "target",
    [
        "/eu/../x",
        "/eu/..",
        "/eu/%2e%2e/x",
        "/eu/%2E%2E/x",
        "/eu/.%2e/x",
        "/eu/%2e./x",
        "/eu/a/../../x",
        "/eu/a/./../../x",
        "/eu//../x",
    ],
)
def test_dot_dot_climbing_above_the_prefix_is_refused(target: str) -> None:
    """A '..' segment, raw or percent-encoded, that climbs above the prefix is a 400."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2")])
    with pytest.raises(BadRequest) as caught:
        table.match(target)
    assert caught.value.status == 400


def test_dot_dot_climbing_above_the_root_route_is_refused() -> None:
    """Even under the root route, a path that climbs above '/' is refused."""
    table = RouteTable([route("/", "http://127.0.0.1:9/v2")])
    with pytest.raises(BadRequest):
        table.match("/../etc/passwd")


@pytest.mark.parametrize(
    "target", ["/eu/a/../b", "/eu/a/%2e%2e/b", "/eu/a/b/../../c", "/eu/x?up=../../.."]
)
def test_dot_dot_staying_inside_the_prefix_is_forwarded_unchanged(target: str) -> None:
    """A '..' that stays inside the prefix (or sits in the query) is forwarded as sent."""
    table = RouteTable([route("/eu/", "http://127.0.0.1:9/v2")])
    assert table.match(target).target == "http://127.0.0.1:9/v2" + target.removeprefix("/eu")


@pytest.mark.parametrize("target", ["http://evil.example/x", "evil.example:443", "*", "", "x/y"])
def test_non_origin_form_targets_are_refused(target: str) -> None:
    """Absolute-form, authority-form and asterisk targets never choose an upstream."""
    table = RouteTable([route("/", "http://127.0.0.1:9")])
    with pytest.raises(BadRequest):
        table.match(target)


# --- upstream_headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Host",
        "Expect",
    ],
)
def test_upstream_headers_drop_hop_by_hop(name: str) -> None:
    """Hop-by-hop headers (and Host, Expect) are not copied into the upstream request."""
    incoming = headers((name, "some-value"), ("X-Keep", "1"))
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert name.lower() not in names(result)
    assert result["X-Keep"] == "1"


def test_upstream_headers_drop_headers_named_in_connection() -> None:
    """Every header named in Connection (any case, any of several Connection lines) is dropped."""
    incoming = headers(
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Connection", "x-other-hop"),
        ("X-Secret-Hop", "a"),
        ("X-OTHER-HOP", "b"),
        ("X-End-To-End", "c"),
    )
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert names(result) == {"x-end-to-end", "authorization", "x-request-id"}


def test_upstream_headers_replace_the_client_authorization() -> None:
    """The client's Authorization headers never pass; exactly one Bearer <token> is sent."""
    incoming = headers(
        ("Authorization", "Basic dXNlcjpwYXNz"), ("authorization", "Bearer client-key")
    )
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert result.getall("Authorization") == [f"Bearer {TOKEN}"]


def test_upstream_headers_keep_repeated_headers_in_order() -> None:
    """Repeated end-to-end request headers all pass, in their original order."""
    incoming = headers(("X-Multi", "a"), ("Accept", "text/html"), ("X-Multi", "b"))
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert result.getall("X-Multi") == ["a", "b"]
    assert result["Accept"] == "text/html"


def test_upstream_headers_add_nothing_but_authorization_and_request_id() -> None:
    """Only Authorization and X-Request-ID are added; no Accept-Encoding/User-Agent/Content-Type."""
    incoming = headers(("X-Only", "1"))
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert names(result) == {"x-only", "authorization", "x-request-id"}
    assert result["X-Request-ID"] == REQUEST_ID


def test_upstream_headers_set_the_request_id_given() -> None:
    """X-Request-ID upstream is the one the proxy chose, never a second copy of the client's."""
    incoming = headers(("X-Request-ID", "client-chosen"))
    result = upstream_headers(incoming, token=TOKEN, request_id="proxy-chosen")
    assert result.getall("X-Request-ID") == ["proxy-chosen"]


def test_upstream_headers_keep_end_to_end_entity_headers() -> None:
    """Content-Type, Content-Length and Content-Encoding of the client pass untouched."""
    incoming = headers(
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Content-Encoding", "gzip"),
    )
    result = upstream_headers(incoming, token=TOKEN, request_id=REQUEST_ID)
    assert result["Content-Type"] == "application/json"
    assert result["Content-Length"] == "12"
    assert result["Content-Encoding"] == "gzip"


# --- downstream_headers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Connection",
    ],
)
def test_downstream_headers_drop_hop_by_hop(name: str) -> None:
    """Hop-by-hop response headers are not copied to the client."""
    incoming = headers((name, "some-value"), ("X-Keep", "1"))
    result = downstream_headers(incoming, request_id=REQUEST_ID)
    assert name.lower() not in names(result)
    assert result["X-Keep"] == "1"


def test_downstream_headers_drop_headers_named_in_connection() -> None:
    """Response headers named in upstream's Connection header are dropped."""
    incoming = headers(("Connection", "X-Upstream-Hop"), ("X-Upstream-Hop", "a"), ("X-Keep", "b"))
    result = downstream_headers(incoming, request_id=REQUEST_ID)
    assert names(result) == {"x-keep", "x-request-id"}


def test_downstream_headers_keep_every_set_cookie() -> None:
    """Several Set-Cookie headers stay separate and in order; repeated headers all pass."""
    incoming = headers(
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        ("Vary", "Accept"),
        ("Vary", "Origin"),
    )
    result = downstream_headers(incoming, request_id=REQUEST_ID)
    assert result.getall("Set-Cookie") == [
        "a=1; Path=/",
        "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
    ]
    assert result.getall("Vary") == ["Accept", "Origin"]


def test_downstream_headers_keep_encoding_and_length_and_add_request_id() -> None:
    """Content-Encoding and Content-Length pass untouched and X-Request-ID is set."""
    incoming = headers(("Content-Encoding", "gzip"), ("Content-Length", "99"))
    result = downstream_headers(incoming, request_id=REQUEST_ID)
    assert result["Content-Encoding"] == "gzip"
    assert result["Content-Length"] == "99"
    assert result.getall("X-Request-ID") == [REQUEST_ID]


def test_downstream_headers_replace_the_upstream_request_id() -> None:
    """The client sees the proxy's X-Request-ID only, never a second one from upstream."""
    incoming = headers(("X-Request-ID", "upstream-chosen"), ("X-Keep", "1"))
    result = downstream_headers(incoming, request_id=REQUEST_ID)
    assert result.getall("X-Request-ID") == [REQUEST_ID]
