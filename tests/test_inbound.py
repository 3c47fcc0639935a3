"""Unit tests of team keys: the [[clients]] entries (proxy.config.Client and the checks Settings
makes of them) and the Gate that names the client of a request or refuses it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from proxy import inbound
from proxy.config import Client, Settings, load_settings
from proxy.errors import ConfigError, Unauthorized
from proxy.inbound import ANONYMOUS, Gate

DASHBOARD_KEY = "dashboard-team-key-5d41402abc4b2a76"
BATCH_KEY = "batch-team-key-7d793037a0760186574b"
BATCH_SHA256 = hashlib.sha256(BATCH_KEY.encode()).hexdigest()
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (the address under test, never bound here)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    built: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        built.add(name, value)
    return CIMultiDictProxy(built)


def bearer(key: str) -> CIMultiDictProxy[str]:
    return headers(("Authorization", f"Bearer {key}"))


def team() -> list[Client]:
    return [
        Client.model_validate({"name": "dashboard", "key": DASHBOARD_KEY}),
        Client.model_validate({"name": "batch", "key_sha256": BATCH_SHA256}),
    ]


def settings_with(**values: Any) -> Settings:
    """Settings with one loopback credential and route, plus `values`."""
    data: dict[str, Any] = {
        "credentials": {
            "c": {
                "client_id": "id",
                "client_secret": "secret-value",
                "token_url": "http://127.0.0.1:9/token",
            }
        },
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": "c"}],
    }
    data.update(values)
    return Settings.model_validate(data)


# --- Client: keys ------------------------------------------------------------------------------


def test_plain_key_of_16_characters_or_more_is_accepted() -> None:
    """A plain key of at least 16 characters is kept as a secret and compared by its sha256."""
    client = Client.model_validate({"name": "a", "key": "k" * 16})
    assert client.key is not None
    assert client.key.get_secret_value() == "k" * 16
    assert client.digest == hashlib.sha256(b"k" * 16).digest()


@pytest.mark.parametrize("key", ["", "short", "k" * 15])
def test_plain_key_shorter_than_16_characters_is_refused(key: str) -> None:
    """A plain key under 16 characters is refused with a hint to use a random one."""
    with pytest.raises(ValidationError, match="16"):
        Client.model_validate({"name": "a", "key": key})


def test_key_sha256_of_64_hex_digits_is_accepted_in_either_case() -> None:
    """key_sha256 takes 64 hex digits (upper or lower case) and compares as their bytes."""
    lower = Client.model_validate({"name": "a", "key_sha256": BATCH_SHA256})
    upper = Client.model_validate({"name": "a", "key_sha256": BATCH_SHA256.upper()})
    assert lower.digest == upper.digest == hashlib.sha256(BATCH_KEY.encode()).digest()


@pytest.mark.parametrize(
    "value",
    [
        "",
        BATCH_SHA256[:63],
        BATCH_SHA256 + "0",
        "g" * 64,
        "z" + BATCH_SHA256[1:],
        BATCH_SHA256[:62] + " x",
        hashlib.sha1(BATCH_KEY.encode()).hexdigest(),  # noqa: S324  (a wrong-length digest)
    ],
)
def test_key_sha256_that_is_not_64_hex_digits_is_refused(value: str) -> None:
    """key_sha256 must be exactly 64 hex digits; anything else is refused naming hash-key."""
    with pytest.raises(ValidationError, match="hash-key"):
        Client.model_validate({"name": "a", "key_sha256": value})


def test_key_and_key_sha256_together_are_refused() -> None:
    """A client sets exactly one of key and key_sha256: both at once is refused."""
    with pytest.raises(ValidationError, match="exactly one"):
        Client.model_validate({"name": "a", "key": DASHBOARD_KEY, "key_sha256": BATCH_SHA256})


def test_client_without_any_key_is_refused() -> None:
    """A client with neither key nor key_sha256 is refused."""
    with pytest.raises(ValidationError, match="exactly one"):
        Client.model_validate({"name": "a"})


def test_plain_key_is_hidden_in_repr_and_dumps() -> None:
    """A plain key is a secret: repr, str and JSON of the client and of Settings hide it."""
    client = Client.model_validate({"name": "a", "key": DASHBOARD_KEY})
    settings = settings_with(clients=[{"name": "a", "key": DASHBOARD_KEY}])
    for shown in (repr(client), str(client), client.model_dump_json(), repr(settings)):
        assert DASHBOARD_KEY not in shown
    assert settings.model_dump_json().count(DASHBOARD_KEY) == 0


# --- Client: names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "dashboard", "team-1", "ci.bot_2", "A" * 64, "0day"])
def test_label_safe_client_names_are_accepted(name: str) -> None:
    """Names of 1 to 64 letters, digits, '.', '_' or '-' (starting alphanumeric) are accepted."""
    assert Client.model_validate({"name": name, "key": DASHBOARD_KEY}).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A" * 65,
        "has space",
        'quote"d',
        "brace}",
        "back\\slash",
        "new\nline",
        "-leading-dash",
        ".hidden",
        "caf\u00e9",
        "a=b",
        "a,b",
    ],
)
def test_client_names_that_are_not_label_safe_are_refused(name: str) -> None:
    """A name that could break a log line or a Prometheus label is refused."""
    with pytest.raises(ValidationError, match="metric label"):
        Client.model_validate({"name": name, "key": DASHBOARD_KEY})


def test_client_names_must_be_unique() -> None:
    """Two [[clients]] with one name are refused, naming it."""
    with pytest.raises(ValidationError, match="'dashboard' is used more than once"):
        settings_with(
            clients=[
                {"name": "dashboard", "key": DASHBOARD_KEY},
                {"name": "dashboard", "key_sha256": BATCH_SHA256},
            ]
        )


def test_two_clients_with_one_key_are_refused() -> None:
    """A key given to two clients (once plain, once as sha256) is refused."""
    same = hashlib.sha256(DASHBOARD_KEY.encode()).hexdigest()
    with pytest.raises(ValidationError, match="share one key"):
        settings_with(
            clients=[{"name": "a", "key": DASHBOARD_KEY}, {"name": "b", "key_sha256": same}]
        )


def test_clients_table_from_toml_is_loaded(tmp_path: Path) -> None:
    """[[clients]] entries in the TOML file become Clients with a key or a key_sha256."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[credentials.c]\nclient_id = "id"\nclient_secret = "secret-value"\n'
        'token_url = "http://127.0.0.1:9/token"\n'
        '[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:9"\ncredential = "c"\n'
        f'[[clients]]\nname = "dashboard"\nkey = "{DASHBOARD_KEY}"\n'
        f'[[clients]]\nname = "batch"\nkey_sha256 = "{BATCH_SHA256}"\n',
        encoding="utf-8",
    )
    settings = load_settings(config_file=config)
    assert [client.name for client in settings.clients] == ["dashboard", "batch"]
    assert [client.digest for client in settings.clients] == [
        hashlib.sha256(DASHBOARD_KEY.encode()).digest(),
        hashlib.sha256(BATCH_KEY.encode()).digest(),
    ]


def test_bad_client_in_toml_is_a_config_error_naming_the_entry(tmp_path: Path) -> None:
    """A short key in [[clients]] is a ConfigError that names clients[0].key."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[credentials.c]\nclient_id = "id"\nclient_secret = "secret-value"\n'
        'token_url = "http://127.0.0.1:9/token"\n'
        '[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:9"\ncredential = "c"\n'
        '[[clients]]\nname = "dashboard"\nkey = "too-short"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config)
    assert "clients[0].key" in caught.value.detail
    assert "too-short" not in caught.value.detail


# --- Gate --------------------------------------------------------------------------------------


def test_gate_without_clients_lets_everyone_in_anonymously() -> None:
    """With no [[clients]] the gate is off and every request, keyed or not, is anonymous."""
    gate = Gate([])
    assert not gate.enabled
    assert gate.identify(headers()) == ANONYMOUS
    assert gate.identify(bearer("whatever-the-client-sends")) == ANONYMOUS


def test_gate_names_the_client_whose_key_is_sent() -> None:
    """A right key, plain or configured as sha256, names its client."""
    gate = Gate(team())
    assert gate.enabled
    assert gate.identify(bearer(DASHBOARD_KEY)) == "dashboard"
    assert gate.identify(bearer(BATCH_KEY)) == "batch"


def test_gate_accepts_the_bearer_scheme_in_any_case() -> None:
    """The auth scheme is case-insensitive (RFC 9110 11.1): 'bearer' and 'BEARER' work."""
    gate = Gate(team())
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert gate.identify(headers(("Authorization", f"{scheme} {BATCH_KEY}"))) == "batch"


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param([], id="missing"),
        pytest.param([""], id="empty"),
        pytest.param(["Bearer"], id="bearer-without-key"),
        pytest.param(["Bearer "], id="bearer-and-space"),
        pytest.param(["Bearer    "], id="bearer-and-spaces"),
        pytest.param([DASHBOARD_KEY], id="key-without-scheme"),
        pytest.param(["Basic ZGFzaGJvYXJkOmtleQ=="], id="basic"),
        pytest.param([f"Basic {DASHBOARD_KEY}"], id="basic-with-the-key"),
        pytest.param([f"Token {DASHBOARD_KEY}"], id="other-scheme"),
        pytest.param(["Bearer wrong-key-of-enough-length"], id="wrong-key"),
        pytest.param([f"Bearer {DASHBOARD_KEY[:-1]}"], id="key-prefix"),
        pytest.param([f"Bearer {DASHBOARD_KEY}x"], id="key-with-suffix"),
        pytest.param([f"Bearer {DASHBOARD_KEY.upper()}"], id="key-in-other-case"),
        pytest.param([f"Bearer {BATCH_SHA256}"], id="the-sha256-itself"),
        pytest.param([f"Bearer {DASHBOARD_KEY}", f"Bearer {DASHBOARD_KEY}"], id="sent-twice"),
        pytest.param([f"Bearer {DASHBOARD_KEY}", "Bearer wrong-key"], id="right-and-wrong"),
    ],
)
def test_gate_refuses_missing_malformed_or_wrong_keys(sent: list[str]) -> None:
    """No key, a malformed Authorization, a wrong key or several Authorization headers is 401."""
    gate = Gate(team())
    with pytest.raises(Unauthorized) as caught:
        gate.identify(headers(*(("Authorization", value) for value in sent)))
    assert caught.value.status == 401
    assert caught.value.headers == {"WWW-Authenticate": 'Bearer realm="token-proxy"'}
    assert DASHBOARD_KEY not in caught.value.detail


def test_gate_ignores_keys_in_other_headers() -> None:
    """A right key in Proxy-Authorization, X-Api-Key or the query is not a team key."""
    gate = Gate(team())
    with pytest.raises(Unauthorized):
        gate.identify(
            headers(
                ("Proxy-Authorization", f"Bearer {DASHBOARD_KEY}"),
                ("X-Api-Key", DASHBOARD_KEY),
            )
        )


CompareDigest = Callable[[bytes, bytes], bool]


def counting_compare(calls: list[tuple[bytes, bytes]]) -> CompareDigest:
    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    return compare


@pytest.mark.parametrize(
    ("key", "expected"),
    [(DASHBOARD_KEY, "dashboard"), (BATCH_KEY, "batch"), ("not-a-key-of-anyone-at-all", None)],
    ids=["first-matches", "last-matches", "none-matches"],
)
def test_gate_compares_every_client_digest_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, key: str, expected: str | None
) -> None:
    """The sha256 of the key is compared with hmac.compare_digest against every client's
    digest, once each, whichever client (if any) matches: the time says nothing about which."""
    calls: list[tuple[bytes, bytes]] = []
    monkeypatch.setattr(inbound, "hmac", SimpleNamespace(compare_digest=counting_compare(calls)))
    clients = [*team(), Client.model_validate({"name": "third", "key": "third-team-key-0123"})]
    gate = Gate(clients)
    if expected is None:
        with pytest.raises(Unauthorized):
            gate.identify(bearer(key))
    else:
        assert gate.identify(bearer(key)) == expected
    sent = hashlib.sha256(key.encode()).digest()
    assert len(calls) == len(clients)
    assert all(first == sent for first, _ in calls)
    assert sorted(second for _, second in calls) == sorted(c.digest for c in clients)
