"""The egress proxy settings: proxy URLs checked and parsed, the environment's variables read as
urllib reads them, NO_PROXY matched as urllib matches it, outbound_proxy over the environment
(top level, per credential, per route), and configuration errors that never quote a password."""

from __future__ import annotations

import base64
import re
import urllib.request
from pathlib import Path

import pytest

from proxy.config import Settings, load_settings
from proxy.config.egress import Egress, EgressProxy, ProxyEnvironment, parse_proxy_url
from proxy.egress import register_secrets
from proxy.errors import ConfigError
from proxy.log import redactor

PASSWORD = "Pr0xy-Pa55-Never-Shown-3c9e"


def proxy(host: str = "proxy.corp", port: int = 3128) -> EgressProxy:
    return EgressProxy(host=host, port=port, setting="HTTPS_PROXY")


@pytest.fixture
def shorthand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", "id")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", "secret-value")
    monkeypatch.setenv("TOKEN_PROXY_REGION", "eu")
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(tmp_path))


def config_error() -> str:
    with pytest.raises(ConfigError) as info:
        load_settings()
    return info.value.detail


# --- proxy URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host", "port", "user", "password"),
    [
        ("http://proxy.corp:3128", "proxy.corp", 3128, "", ""),
        ("proxy.corp:3128", "proxy.corp", 3128, "", ""),
        ("http://proxy.corp", "proxy.corp", 80, "", ""),
        ("http://proxy.corp:3128/", "proxy.corp", 3128, "", ""),
        ("HTTP://Proxy.Corp:3128", "proxy.corp", 3128, "", ""),
        ("http://[::1]:3128", "::1", 3128, "", ""),
        ("http://alice:s%40cret%3A1@proxy.corp:8080", "proxy.corp", 8080, "alice", "s@cret:1"),
        ("http://dom%5Calice:pw@10.0.0.1:3128", "10.0.0.1", 3128, "dom\\alice", "pw"),
    ],
)
def test_a_proxy_url_is_parsed_as_curl_and_requests_take_it(
    value: str, host: str, port: int, user: str, password: str
) -> None:
    """Scheme optional (http), port 80 by default, user and password percent-decoded."""
    parsed = parse_proxy_url(value, setting="outbound_proxy")
    assert (parsed.host, parsed.port, parsed.username, parsed.password) == (
        host,
        port,
        user,
        password,
    )
    assert "@" not in parsed.url
    assert password not in repr(parsed) or not password


def test_proxy_authorization_is_basic_of_user_and_password_in_utf8() -> None:
    parsed = parse_proxy_url("http://j%C3%BCrgen:p%C3%A4ss@proxy:1", setting="outbound_proxy")
    expected = base64.b64encode("jürgen:päss".encode()).decode()
    assert parsed.authorization == f"Basic {expected}"
    assert parse_proxy_url("http://proxy:1", setting="x").authorization is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (f"https://user:{PASSWORD}@proxy:443", "https:// egress proxy"),
        (f"socks5://user:{PASSWORD}@proxy:1080", "SOCKS"),
        (f"ftp://user:{PASSWORD}@proxy:21", "not a proxy URL"),
        (f"http://user:{PASSWORD}@proxy:port", "no valid port"),
        (f"http://user:{PASSWORD}@proxy:99999", "no valid port"),
        (f"http://user:{PASSWORD}@:3128", "names no host"),
        (f"http://user:{PASSWORD}@proxy:3128/path", "path"),
        (f"http://us%3Aer:{PASSWORD}@proxy:3128", "':' in its user name"),
    ],
)
def test_a_bad_proxy_url_says_what_to_fix_without_its_password(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        parse_proxy_url(value, setting="outbound_proxy")
    assert PASSWORD not in str(info.value)


# --- NO_PROXY, as urllib matches it --------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "netloc", "bypass"),
    [
        ("example.com", "example.com", True),
        ("example.com", "api.example.com", True),
        ("example.com", "badexample.com", False),
        (".example.com", "api.example.com", True),
        (".example.com", "example.com", True),
        ("EXAMPLE.com", "Api.Example.COM:443", True),
        ("example.com:8443", "example.com:8443", True),
        ("example.com:8443", "example.com", False),
        ("10.1.2.3", "10.1.2.3:443", True),
        ("10.1.2.3", "10.1.2.30", False),
        ("10.0.0.0/8", "10.1.2.3", False),  # urllib has no CIDR
        ("*", "anything.at.all", True),
        (" a.test , ,b.test ", "x.b.test", True),
        ("", "example.com", False),
    ],
)
def test_no_proxy_is_matched_as_urllib_matches_it(no_proxy: str, netloc: str, bypass: bool) -> None:
    egress = Egress(https=proxy(), no_proxy=no_proxy)
    assert (egress.proxy_for("https", netloc) is None) is bypass
    # The same answer urllib's own ProxyHandler would give.
    assert urllib.request.proxy_bypass_environment(netloc, {"no": no_proxy}) is bypass  # type: ignore[attr-defined]


def test_each_scheme_takes_its_own_proxy() -> None:
    http, https = proxy("h"), proxy("s")
    egress = Egress(http=http, https=https)
    assert egress.proxy_for_url("http://api.test/x") is http
    assert egress.proxy_for_url("https://api.test/x") is https
    assert Egress(https=https).proxy_for_url("http://api.test/x") is None


# --- the environment -----------------------------------------------------------------------------


def test_environment_prefers_lower_case_and_an_empty_variable_unsets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As urllib's getproxies_environment: https_proxy over HTTPS_PROXY, an empty http_proxy
    unsets HTTP_PROXY, NO_PROXY in either case."""
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    monkeypatch.setenv("https_proxy", "http://lower:2")
    monkeypatch.setenv("HTTP_PROXY", "http://gone:3")
    monkeypatch.setenv("http_proxy", "")
    monkeypatch.setenv("NO_PROXY", "internal.test")
    egress = ProxyEnvironment.read().egress()
    assert egress.https == EgressProxy("lower", 2, "https_proxy")
    assert egress.http is None
    assert egress.no_proxy == "internal.test"


def test_http_proxy_is_ignored_in_a_cgi_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpoxy (CVE-2016-1000110), as urllib: with REQUEST_METHOD set, HTTP_PROXY may come from
    a client's Proxy header and is not used."""
    monkeypatch.setenv("HTTP_PROXY", "http://attacker:1")
    monkeypatch.setenv("REQUEST_METHOD", "GET")
    assert ProxyEnvironment.read().egress().http is None


# --- Settings ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("shorthand")
def test_the_environments_proxy_is_used_when_nothing_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "oauth.battle.net")
    settings = load_settings()
    route = settings.routes[0]
    via = settings.route_egress(route).proxy_for_url(route.upstream)
    assert via == EgressProxy("proxy.corp", 3128, "HTTPS_PROXY")
    token_url = settings.credentials["default"].token_url
    assert settings.credential_egress("default").proxy_for_url(token_url) is None


@pytest.mark.usefixtures("shorthand")
def test_outbound_proxy_replaces_both_variables_and_no_proxy_still_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://env-https:1")
    monkeypatch.setenv("HTTP_PROXY", "http://env-http:2")
    monkeypatch.setenv("NO_PROXY", "skip.test")
    monkeypatch.setenv("TOKEN_PROXY_OUTBOUND_PROXY", "http://setting:3")
    egress = load_settings().credential_egress("default")
    mine = EgressProxy("setting", 3, "outbound_proxy")
    assert egress.proxy_for_url("https://a.test/") == mine
    assert egress.proxy_for_url("http://127.0.0.1/") == mine
    assert egress.proxy_for_url("https://api.skip.test/") is None


@pytest.mark.usefixtures("shorthand")
def test_empty_outbound_proxy_turns_the_environments_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://env-https:1")
    monkeypatch.setenv("TOKEN_PROXY_OUTBOUND_PROXY", "")
    settings = load_settings()
    assert settings.credential_egress("default").direct
    assert settings.route_egress(settings.routes[0]).direct


def test_credentials_and_routes_may_have_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential's or route's outbound_proxy wins over the top level's; "" is direct."""
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://env:1")
    config = tmp_path / "config.toml"
    config.write_text(
        'outbound_proxy = "http://top:2"\n'
        "[credentials.a]\n"
        'client_id = "a"\nclient_secret = "secret-a"\ntoken_url = "https://a.test/token"\n'
        'outbound_proxy = "http://cred:3"\n'
        "[credentials.b]\n"
        'client_id = "b"\nclient_secret = "secret-b"\ntoken_url = "https://b.test/token"\n'
        "[[routes]]\n"
        'prefix = "/a/"\nupstream = "https://a.test"\ncredential = "a"\noutbound_proxy = ""\n'
        "[[routes]]\n"
        'prefix = "/b/"\nupstream = "https://b.test"\ncredential = "b"\n'
        'outbound_proxy = "http://route:4"\n',
        encoding="utf-8",
    )
    settings = load_settings(config_file=config)
    assert settings.credential_egress("a").https == EgressProxy(
        "cred", 3, "credentials.a.outbound_proxy"
    )
    assert settings.credential_egress("b").https == EgressProxy("top", 2, "outbound_proxy")
    route_a, route_b = settings.routes
    assert settings.route_egress(route_a).direct
    assert settings.route_egress(route_b).https == EgressProxy(
        "route", 4, "routes[1].outbound_proxy"
    )


@pytest.mark.usefixtures("shorthand")
def test_a_bad_outbound_proxy_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKEN_PROXY_OUTBOUND_PROXY", f"socks5://me:{PASSWORD}@proxy:1080")
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_OUTBOUND_PROXY: ")
    assert "SOCKS" in message
    assert PASSWORD not in message


@pytest.mark.usefixtures("shorthand")
def test_a_bad_proxy_variable_is_a_config_error_when_it_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY that is no proxy URL is refused, naming the variable, unless
    outbound_proxy replaces it."""
    monkeypatch.setenv("HTTPS_PROXY", f"http://me:{PASSWORD}@proxy:notaport")
    message = config_error()
    assert message.startswith("environment variable HTTPS_PROXY: ")
    assert "no valid port" in message
    assert "outbound_proxy" in message
    assert PASSWORD not in message
    monkeypatch.setenv("TOKEN_PROXY_OUTBOUND_PROXY", "http://good:3128")
    assert load_settings().outbound_proxy is not None


def test_outbound_proxy_is_a_secret_in_every_form(tmp_path: Path) -> None:
    """Its repr hides it; the redactor learns the password, user:password and the Basic
    value, so that no log line can show them."""
    settings = Settings.model_validate(
        {
            "client_id": "id",
            "client_secret": "secret-value",
            "region": "eu",
            "outbound_proxy": f"http://me:{PASSWORD}@proxy:3128",
        }
    )
    assert PASSWORD not in repr(settings)
    register_secrets(settings)
    basic = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
    line = f"pw={PASSWORD} pair=me:{PASSWORD} basic={basic}"
    scrubbed = redactor.scrub(line)
    assert PASSWORD not in scrubbed
    assert basic not in scrubbed
