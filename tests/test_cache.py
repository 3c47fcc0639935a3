"""The response cache's parts on their own: RFC 9111's rules beside hishel's where both apply,
the entries' bound in bytes under 10,000 distinct URLs, and the cache's settings."""

from __future__ import annotations

import time
import tracemalloc
from email.utils import formatdate
from typing import Any

import hishel
import pytest
from hishel._core._spec import get_age, get_freshness_lifetime
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache import policy
from proxy.cache.policy import Entry
from proxy.cache.storage import MemoryEntries
from proxy.config import Settings

NOW = float(int(time.time()))
NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def headers_of(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def entry(
    fields: list[tuple[str, str]],
    *,
    url: str = "https://api.test/item",
    body: bytes = b"{}",
    request: CIMultiDictProxy[str] = NO_HEADERS,
    request_time: float = NOW,
    response_time: float = NOW,
) -> Entry | None:
    kept = policy.storable("GET", url, 200, fields)
    if kept is None:
        return None
    return policy.entry_of(
        primary=("credential", "GET", url),
        request_headers=request,
        status=200,
        reason="OK",
        fields=kept,
        body=body,
        request_time=request_time,
        response_time=response_time,
    )


def date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


# --- beside hishel -----------------------------------------------------------------------------


@given(
    max_age=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
    expires_in=st.one_of(st.none(), st.integers(min_value=-1000, max_value=10**6)),
    s_maxage=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
)
def test_explicit_freshness_agrees_with_hishels_private_cache(
    max_age: int | None, expires_in: int | None, s_maxage: int | None
) -> None:
    """Where an answer states its freshness, ours is hishel's for a private cache (s-maxage
    ignored): only the heuristic, absent here, tells them apart."""
    controls = [f"max-age={max_age}"] if max_age is not None else []
    controls += [f"s-maxage={s_maxage}"] if s_maxage is not None else []
    fields = [("Date", date(NOW)), ("ETag", '"v"')]
    if controls:
        fields.append(("Cache-Control", ", ".join(controls)))
    if expires_in is not None:
        fields.append(("Expires", date(NOW + expires_in)))
    ours = entry(fields)
    assert ours is not None
    theirs = get_freshness_lifetime(
        hishel.Response(status_code=200, headers=policy._hishel_headers(fields)),
        is_cache_shared=False,
    )
    if max_age is None and expires_in is None:
        assert ours.freshness_lifetime == 0  # hishel: its heuristic, or None
    else:
        assert theirs is not None
        assert ours.freshness_lifetime == max(0, theirs)


def test_no_heuristic_freshness_where_hishel_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Battle.net's token price: Last-Modified a day ago and nothing else. hishel would call it
    fresh for 10 % of a day; here it is stored only to be revalidated."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    fields = [("Date", date(NOW)), ("Last-Modified", date(NOW - 86400))]
    theirs = get_freshness_lifetime(
        hishel.Response(status_code=200, headers=policy._hishel_headers(fields)),
        is_cache_shared=False,
    )
    assert theirs == 8640
    ours = entry(fields)
    assert ours is not None
    assert ours.freshness_lifetime == 0
    assert not policy.PLAIN.accepts(ours, NOW)


def test_age_counts_what_hishels_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9111 §4.2.3: with no Age and no delay both agree (now minus Date); ours adds the
    Age received and the response delay, and reads the cache's clock."""
    fields = [("Date", date(NOW - 30)), ("Cache-Control", "max-age=600")]
    plain = entry(fields)
    assert plain is not None
    monkeypatch.setattr(time, "time", lambda: NOW + 10)
    response = hishel.Response(status_code=200, headers=policy._hishel_headers(fields))
    assert plain.age(NOW + 10) == get_age(response) == 40
    aged = entry([*fields, ("Age", "100")], request_time=NOW - 2)
    assert aged is not None
    assert aged.age(NOW + 10) == 100 + 2 + 10
    assert all(name.lower() != "age" for name, _ in aged.headers)


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ([("Cache-Control", "max-age=60")], True),
        ([("Cache-Control", "private, max-age=60")], True),
        ([("Cache-Control", "no-store, max-age=60")], False),
        ([("Cache-Control", "max-age=60"), ("Vary", "*")], False),
        ([("ETag", '"v"')], True),
        ([], False),  # hishel would store it (200 is heuristically cacheable): never reusable
        ([("Cache-Control", "no-cache, max-age=60")], False),
        ([("Cache-Control", "no-cache"), ("ETag", '"v"')], True),
    ],
)
def test_what_is_stored(fields: list[tuple[str, str]], stored: bool) -> None:
    assert (entry(fields) is not None) is stored


def test_qualified_no_cache_fields_and_set_cookie_are_left_out() -> None:
    kept = policy.storable(
        "GET",
        "https://api.test/",
        200,
        [
            ("Cache-Control", 'max-age=60, no-cache="X-Secret, Set-Cookie2"'),
            ("X-Secret", "per request"),
            ("Set-Cookie", "a=b"),
            ("Content-Type", "application/json"),
        ],
    )
    assert kept is not None
    assert [name for name, _ in kept] == ["Cache-Control", "Content-Type"]


def test_a_304_refreshes_the_entry_as_hishel_selects_and_merges() -> None:
    stored = entry(
        [
            ("Cache-Control", "max-age=10"),
            ("ETag", '"v1"'),
            ("Content-Type", "application/json"),
            ("X-Old", "1"),
        ]
    )
    assert stored is not None
    fresh = policy.refreshed(
        stored,
        [("Cache-Control", "max-age=100"), ("ETag", '"v1"'), ("Content-Type", "text/plain")],
        request_headers=NO_HEADERS,
        request_time=NOW + 50,
        response_time=NOW + 50,
    )
    assert fresh is not None
    assert fresh.headers == (
        ("Content-Type", "application/json"),  # a 304 never changes what describes the body
        ("X-Old", "1"),
        ("Cache-Control", "max-age=100"),
        ("ETag", '"v1"'),
    )
    assert (fresh.freshness_lifetime, fresh.body) == (100, stored.body)
    other = policy.refreshed(
        stored,
        [("ETag", '"v2"')],
        request_headers=NO_HEADERS,
        request_time=NOW,
        response_time=NOW,
    )
    assert other is None


def test_cache_control_directives() -> None:
    found = policy.directives(['max-age=60, no-cache="a, b"', "MAX-AGE=5, Private", "s-maxage=x"])
    assert found == {"max-age": "60", "no-cache": "a, b", "private": None, "s-maxage": "x"}
    broken = entry([("Cache-Control", "max-age=soon"), ("ETag", '"v"')])
    assert broken is not None
    assert broken.freshness_lifetime == 0  # a malformed max-age is stale


@pytest.mark.parametrize(
    ("asked", "etag", "modified", "answer"),
    [
        ({"If-None-Match": '"v1"'}, '"v1"', None, True),
        ({"If-None-Match": 'W/"v1"'}, '"v1"', None, True),
        ({"If-None-Match": '"v0", W/"v1"'}, 'W/"v1"', None, True),
        ({"If-None-Match": '"v0"'}, '"v1"', None, False),
        ({"If-None-Match": "*"}, None, None, True),
        ({"If-Modified-Since": date(NOW)}, None, date(NOW - 1), True),
        ({"If-Modified-Since": date(NOW - 2)}, None, date(NOW - 1), False),
        ({"If-Modified-Since": "yesterday"}, None, date(NOW - 1), False),
        # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
        ({"If-None-Match": '"v0"', "If-Modified-Since": date(NOW)}, '"v1"', date(NOW), False),
    ],
)
def test_a_clients_validators(
    asked: dict[str, str], etag: str | None, modified: str | None, answer: bool
) -> None:
    request = policy.asked(CIMultiDictProxy(CIMultiDict(asked)))
    assert policy.not_modified(request, status=200, etag=etag, last_modified=modified) is answer
    assert not policy.not_modified(request, status=404, etag=etag, last_modified=modified)


def test_a_request_that_says_nothing_costs_no_allocation() -> None:
    assert policy.asked(headers_of(Accept="application/json")) is policy.PLAIN


# --- the bound in bytes ---------------------------------------------------------------------------


def test_the_byte_bound_holds_under_10000_distinct_urls() -> None:
    evicted: list[int] = []
    bound = 256 * 1024
    entries = MemoryEntries(max_bytes=bound, on_evict=evicted.append)
    for number in range(10_000):
        assert entries.put(_answer(number))
        assert entries.bytes <= bound
        if number % 50 == 0:
            # One URL asked again and again stays while thousands pass through.
            kept = entries.find(("credential", "GET", _url(0)), NO_HEADERS)
            assert kept is not None
            entries.touch(kept)
    assert sum(evicted) == 10_000 - len(entries)
    assert 50 < len(entries) < 200
    assert entries.find(("credential", "GET", _url(9_999)), NO_HEADERS) is not None
    assert entries.find(("credential", "GET", _url(5_000)), NO_HEADERS) is None


def test_what_the_bound_counts_is_what_the_entries_hold() -> None:
    bound = 256 * 1024
    entries = MemoryEntries(max_bytes=bound)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for number in range(400):
            entries.put(_answer(number))
        held = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert entries.bytes <= bound
    assert 0.8 * entries.bytes < held < 1.25 * entries.bytes


def _answer(number: int) -> Entry:
    """A typical answer of 500 to 2,000 bytes, its fields new strings as a response's are."""
    fields = [
        ("Content-Type", "application/json;charset=utf-8"),
        ("Cache-Control", "max-age=60"),
        ("Date", date(NOW)),
    ]
    made = entry(
        [(name.encode().decode(), value.encode().decode()) for name, value in fields],
        url=_url(number),
        body=b"x" * (500 + number * 7 % 1500),
    )
    assert made is not None
    return made


def _url(number: int) -> str:
    return f"https://us.api.blizzard.com/data/wow/item/{number}?namespace=static-us"


def test_an_entry_larger_than_the_bound_is_refused_and_variants_are_replaced() -> None:
    entries = MemoryEntries(max_bytes=4096)
    large = entry([("Cache-Control", "max-age=60")], body=b"x" * 5000)
    assert large is not None
    assert not entries.put(large)
    vary = [("Cache-Control", "max-age=60"), ("Vary", "Accept")]
    json_one = entry(vary, request=headers_of(Accept="application/json"))
    xml_one = entry(vary, request=headers_of(Accept="text/xml"))
    json_two = entry(vary, request=headers_of(Accept="application/json"), body=b"[2]")
    for made in (json_one, xml_one, json_two):
        assert made is not None
        assert entries.put(made)
    assert len(entries) == 2
    primary = ("credential", "GET", "https://api.test/item")
    assert entries.find(primary, headers_of(Accept="application/json")) is json_two
    assert entries.find(primary, headers_of(Accept="text/xml")) is xml_one
    assert entries.find(primary, NO_HEADERS) is None
    assert entries.drop(primary) == 2
    assert (len(entries), entries.bytes) == (0, 0)


# --- settings ---------------------------------------------------------------------------------


def settings(**values: Any) -> Settings:
    base: dict[str, Any] = {"client_id": "id", "client_secret": "secret-value", "port": 0}
    return Settings(**{**base, **values})


def test_the_cache_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = settings()
    assert (plain.cache, plain.cache_max_bytes, plain.cache_max_entry_bytes) == (
        False,
        64 * 1024 * 1024,
        8 * 1024 * 1024,
    )
    assert not plain.caches(plain.routes[0])
    monkeypatch.setenv("TOKEN_PROXY_CACHE", "true")
    monkeypatch.setenv("TOKEN_PROXY_CACHE_MAX_BYTES", "1048576")
    on = Settings.model_validate({"client_id": "id", "client_secret": "secret-value"})
    assert on.caches(on.routes[0])
    # The default entry bound gives way to a smaller cache...
    assert on.cache_entry_limit == 1048576


def test_an_entry_bound_above_the_cache_is_refused_when_set() -> None:
    with pytest.raises(ValueError, match="cache_max_entry_bytes") as caught:
        settings(cache_max_bytes=1000, cache_max_entry_bytes=2000)
    assert "raise" in str(caught.value)


def test_a_route_overrides_the_top_level_cache() -> None:
    made = Settings.model_validate(
        {
            "cache": True,
            "credentials": {
                "c": {
                    "client_id": "id",
                    "client_secret": "secret-value",
                    "token_url": "https://auth.test/token",
                }
            },
            "routes": [
                {"prefix": "/a/", "upstream": "https://a.test", "credential": "c"},
                {"prefix": "/b/", "upstream": "https://b.test", "credential": "c", "cache": False},
            ],
        }
    )
    assert [made.caches(route) for route in made.routes] == [True, False]
