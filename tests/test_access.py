"""The access line's masking of credentials in the request targets it shows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import access
from proxy.access import mask_query
from proxy.log import REDACTED

SENSITIVE = [
    "access_token",
    "ACCESS_TOKEN",
    "refresh_token",
    "id_token",
    "token",
    "client_secret",
    "secret",
    "code",
    "password",
    "passwd",
    "api_key",
    "apikey",
    "x-api-key",
    "key",
    "Key",
    "auth",
    "sig",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "sessionid",
    "access%5Ftoken",
    "client%5fsecret",
]
PLAIN = ["namespace", "locale", "region", "monkey", "keyword", "country_code", "page", "q"]


@pytest.mark.parametrize("name", SENSITIVE)
def test_sensitive_values_are_masked(name: str) -> None:
    target = f"/p?namespace=dynamic-us&{name}=v4lue=with=equals&locale=en_US"
    assert mask_query(target) == f"/p?namespace=dynamic-us&{name}={REDACTED}&locale=en_US"


@pytest.mark.parametrize("name", PLAIN)
def test_other_values_are_kept(name: str) -> None:
    target = f"/p?{name}=value"
    assert mask_query(target) is target


@pytest.mark.parametrize(
    "target", ["/data/wow/token/index", "/", "/p?", "/p?flag", "/p?token", "/p?token="]
)
def test_a_target_without_values_to_mask_is_returned_as_it_is(target: str) -> None:
    assert mask_query(target) is target


def test_a_url_is_masked_like_a_path() -> None:
    url = "https://eu.api.blizzard.com/v2/x?access_token=abc&a=1&a=2"
    assert mask_query(url) == f"https://eu.api.blizzard.com/v2/x?access_token={REDACTED}&a=1&a=2"


_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%=", min_size=1, max_size=12)


@given(
    before=st.lists(st.tuples(st.sampled_from(PLAIN), _VALUE), max_size=4),
    secret=st.tuples(st.sampled_from(SENSITIVE), _VALUE),
    after=st.lists(st.tuples(st.sampled_from(PLAIN), _VALUE), max_size=4),
)
def test_only_the_sensitive_value_changes(
    before: list[tuple[str, str]], secret: tuple[str, str], after: list[tuple[str, str]]
) -> None:
    params = [*before, secret, *after]
    target = "/p?" + "&".join(f"{name}={value}" for name, value in params)
    expected = [
        f"{name}={REDACTED if (name, value) == secret else value}" for name, value in params
    ]
    assert mask_query(target) == "/p?" + "&".join(expected)


def test_plain_queries_are_remembered_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A query found to hold nothing to mask is remembered (one lookup the next time), but
    never more than _MAX_REMEMBERED of them, nor one longer than _MAX_REMEMBERED_QUERY; a
    remembered query never lets a sensitive one through."""
    monkeypatch.setattr(access, "_plain_queries", set())
    target = "/p?namespace=dynamic-us&locale=en_US"
    assert mask_query(target) is target
    assert access._plain_queries == {"namespace=dynamic-us&locale=en_US"}
    assert mask_query(target) is target
    assert (
        mask_query("/p?namespace=dynamic-us&token=abc")
        == f"/p?namespace=dynamic-us&token={REDACTED}"
    )
    long = "/p?q=" + "x" * access._MAX_REMEMBERED_QUERY
    assert mask_query(long) is long
    assert long.partition("?")[2] not in access._plain_queries
    for number in range(access._MAX_REMEMBERED + 10):
        mask_query(f"/p?page={number}")
    assert len(access._plain_queries) == access._MAX_REMEMBERED
