"""Egress proxies: a proxy URL checked and parsed, the environment's HTTPS_PROXY, HTTP_PROXY and
NO_PROXY read as urllib reads them, and the proxy (or none) that each outbound URL goes through."""

from __future__ import annotations

import base64
import os
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

# The schemes of outbound URLs, each with the environment variable of its proxy.
_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP egress proxy: where it listens, the setting that named it, and the user and
    password it wants (secrets: never shown, only sent as Proxy-Authorization)."""

    host: str
    port: int
    # Where it was configured, as a message names it: outbound_proxy, HTTPS_PROXY, ...
    setting: str
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The proxy's address without its user and password, as messages show it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)

    @property
    def authorization(self) -> str | None:
        """The Proxy-Authorization value (RFC 7617 Basic), None without user and password."""
        if not self.has_credentials:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def secrets(self) -> list[str]:
        """Every form in which a log line could show the password, for the redactor."""
        if not self.password:
            return []
        pair = f"{self.username}:{self.password}"
        return [
            self.password,
            quote(self.password, safe=""),
            pair,
            f"{quote(self.username, safe='')}:{quote(self.password, safe='')}",
            base64.b64encode(pair.encode()).decode("ascii"),
        ]


def parse_proxy_url(value: str, *, setting: str) -> EgressProxy:
    """An egress proxy from `http://[user:password@]host[:port]` (the scheme may be left out,
    as curl and requests allow); ValueError saying what to fix, never quoting the password."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    scheme = text.partition("://")[0].lower()
    shown = _without_credentials(text)
    if scheme == "https":
        raise ValueError(
            f"{shown} is an https:// egress proxy (TLS to the proxy itself), which token-proxy "
            "does not speak; write http://host:port: an HTTP proxy still tunnels https:// "
            "upstreams with CONNECT, so it never sees their traffic"
        )
    if scheme.startswith("socks"):
        raise ValueError(
            f"{shown} is a SOCKS proxy, which token-proxy does not speak; give the address "
            "of an HTTP proxy (http://host:port)"
        )
    if scheme != "http":
        raise ValueError(
            f"{shown} is not a proxy URL; write it as http://[user:password@]host:port"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(
            f"{shown} has no valid port; write it as http://[user:password@]host:port"
        ) from None
    if not parts.hostname:
        raise ValueError(f"{shown} names no host; write it as http://[user:password@]host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown} has a path or query, which a proxy address has not; remove it")
    username = unquote(parts.username or "")
    if ":" in username:
        raise ValueError(f"{shown} has a ':' in its user name, which Basic authentication forbids")
    return EgressProxy(
        host=parts.hostname,
        port=port if port is not None else 80,
        setting=setting,
        username=username,
        password=unquote(parts.password or ""),
    )


def _without_credentials(url: str) -> str:
    """`url` with any user and password cut out, to quote it in a message."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    netloc = netloc.rpartition("@")[2]
    return repr(f"{scheme}://{netloc}{slash}{path}")


@dataclass(frozen=True, slots=True)
class Egress:
    """Where outbound requests go: `http://` URLs through `http`, `https://` ones through
    `https`, directly when that is None or when NO_PROXY names the host."""

    http: EgressProxy | None = None
    https: EgressProxy | None = None
    no_proxy: str | None = None

    @property
    def direct(self) -> bool:
        """No URL goes through a proxy."""
        return self.http is None and self.https is None

    def proxy_for(self, scheme: str, netloc: str) -> EgressProxy | None:
        """The proxy for a URL of `scheme` to `netloc` (`host[:port]`, as in the URL), None:
        direct. NO_PROXY is matched by urllib itself, so that it means what it means to
        Python's urllib and requests: host names and their suffixes, IP addresses as
        written, `host:port`, and `*` for every host."""
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None or self.no_proxy is None:
            return proxy
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # undocumented, not in typeshed
        if bypass(netloc, {"no": self.no_proxy}):
            return None
        return proxy

    def proxy_for_url(self, url: str) -> EgressProxy | None:
        parts = urlsplit(url)
        return self.proxy_for(parts.scheme, parts.netloc.rpartition("@")[2])

    def proxies(self) -> list[EgressProxy]:
        return list(dict.fromkeys(p for p in (self.http, self.https) if p is not None))


DIRECT = Egress()


@dataclass(frozen=True, slots=True)
class ProxyEnvironment:
    """HTTPS_PROXY, HTTP_PROXY and NO_PROXY as urllib's getproxies_environment reads them
    (either case, the lower one first; an empty variable unsets it), and each one's name."""

    values: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls) -> ProxyEnvironment:
        """The process environment's (the configuration is loaded once, at start-up)."""
        found = urllib.request.getproxies_environment()
        values = {scheme: found[scheme] for scheme in (*_SCHEMES, "no") if scheme in found}
        names = {
            scheme: f"{scheme}_proxy"
            if os.environ.get(f"{scheme}_proxy")
            else f"{scheme}_proxy".upper()
            for scheme in values
        }
        return cls(values, names)

    @property
    def no_proxy(self) -> str | None:
        return self.values.get("no")

    def egress(self) -> Egress:
        """The egress of everything the configuration leaves to the environment; ValueError
        for a variable that is not a proxy URL (its message names the variable)."""
        proxies: dict[str, EgressProxy | None] = {}
        for scheme in _SCHEMES:
            value = self.values.get(scheme)
            name = self.names.get(scheme, f"{scheme.upper()}_PROXY")
            try:
                proxies[scheme] = None if value is None else parse_proxy_url(value, setting=name)
            except ValueError as exc:
                raise ValueError(f"environment variable {name}: {exc}") from None
        return Egress(http=proxies["http"], https=proxies["https"], no_proxy=self.no_proxy)


def egress_of(configured: str | None, *, setting: str, environment: ProxyEnvironment) -> Egress:
    """The egress an `outbound_proxy` setting makes: None leaves it to the environment, ""
    turns the proxy off, and a URL replaces HTTPS_PROXY and HTTP_PROXY (NO_PROXY still
    applies)."""
    if configured is None:
        return environment.egress()
    if not configured.strip():
        return DIRECT
    proxy = parse_proxy_url(configured, setting=setting)
    return Egress(http=proxy, https=proxy, no_proxy=environment.no_proxy)


def check_proxy_url(value: str) -> str:
    """A field validator's check: "" (no proxy) or a URL parse_proxy_url takes."""
    if value.strip():
        parse_proxy_url(value, setting="")
    return value
