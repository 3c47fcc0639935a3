"""Reading redis_url: the three schemes, verified TLS, and a password that never shows."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from proxy.store.redis_url import parse_redis_url

PASSWORD = "pa55-w0rd-Secret"


def test_a_tcp_url_with_password_and_database() -> None:
    target = parse_redis_url(f"redis://:{PASSWORD}@cache.internal:6380/2")
    kwargs = target.client_kwargs(timeout=0.25)
    assert kwargs["host"] == "cache.internal"
    assert kwargs["port"] == 6380
    assert kwargs["db"] == 2
    assert kwargs["password"] == PASSWORD
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["retry"].get_retries() == 0
    assert "ssl" not in kwargs
    for shown in (repr(target), str(target), target.safe_url):
        assert PASSWORD not in shown
    assert target.safe_url == "redis://:***@cache.internal:6380/2"


def test_defaults_and_a_username() -> None:
    target = parse_redis_url(SecretStr("redis://team-a:p%40ss%2Fword@localhost"))
    assert (target.host, target.port, target.db, target.username) == (
        "localhost",
        6379,
        0,
        "team-a",
    )
    assert target.password is not None
    assert target.password.get_secret_value() == "p@ss/word"


def test_rediss_verifies_the_server_certificate() -> None:
    kwargs = parse_redis_url("rediss://redis.example.com?ssl_ca_certs=/etc/ca.pem").client_kwargs(
        timeout=1.0
    )
    assert kwargs["ssl"] is True
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"


def test_a_unix_socket() -> None:
    target = parse_redis_url(f"unix://:{PASSWORD}@/run/redis/redis.sock?db=3")
    kwargs = target.client_kwargs(timeout=0.25)
    assert kwargs["unix_socket_path"] == "/run/redis/redis.sock"
    assert kwargs["db"] == 3
    assert kwargs["password"] == PASSWORD
    assert "host" not in kwargs
    assert target.safe_url == "unix://:***@/run/redis/redis.sock?db=3"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        (f"http://:{PASSWORD}@host:6379", "'http' scheme"),
        (f"{PASSWORD}", "no scheme"),
        (f"redis://:{PASSWORD}@:6379", "no host"),
        (f"redis://:{PASSWORD}@host:99999", "host or port"),
        (f"redis://:{PASSWORD}@host:port", "host or port"),
        (f"redis://:{PASSWORD}@host/db9", "database"),
        (f"redis://:{PASSWORD}@host?ssl_cert_reqs=none", "does not take"),
        (f"rediss://:{PASSWORD}@host?ssl_cert_reqs=none", "TLS is always verified"),
        (f"redis://:{PASSWORD}@host#frag", "#fragment"),
        (f"unix://:{PASSWORD}@host/run/redis.sock", "names no host"),
        ("unix://", "absolute path"),
        # Unescaped characters push parts of the password into the host, path or query.
        ("redis://:pa/55-w0rd-Secret@host", "percent-encode"),
        ("redis://:pa?55-w0rd-Secret@host", "percent-encode"),
        ("redis://:pa#55-w0rd-Secret@host", "percent-encode"),
    ],
)
def test_a_bad_url_names_the_setting_and_the_fix_and_never_the_password(
    url: str, says: str
) -> None:
    with pytest.raises(ValueError, match="redis_url") as caught:
        parse_redis_url(url)
    message = str(caught.value)
    assert says in message
    assert "redis://" in message  # the fix: what a good one looks like
    for part in ("pa55", "w0rd", "Secret", "55-w0rd"):
        assert part not in message
