"""What a failure of the egress proxy says, for both transports and the token requests: the
proxy unreachable, too slow, or refusing a request or a tunnel (403, 407), each with its fix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

import aiohttp

from proxy.config import Settings
from proxy.config.egress import EgressProxy
from proxy.errors import EgressProxyError, TokenEndpointError
from proxy.log import redactor

# The token request's error code when the egress proxy failed it (/-/ready's last_error).
EGRESS_ERROR_CODE = "egress_proxy"


def egress_proxies(settings: Settings) -> dict[str, list[EgressProxy]]:
    """Every egress proxy the configuration names, by what uses it: each credential's token
    requests and each route's upstream."""
    uses = {
        f"credential {name}": settings.credential_egress(name).proxies()
        for name in settings.credentials
    }
    uses.update({f"route {r.prefix}": settings.route_egress(r).proxies() for r in settings.routes})
    return uses


def summary(settings: Settings) -> dict[str, str]:
    """Which egress proxy each credential's token requests and each route's upstream go
    through (NO_PROXY applied), for the start-up line; empty when all go directly."""
    used = {
        f"credential {name}": settings.credential_egress(name).proxy_for_url(c.token_url)
        for name, c in settings.credentials.items()
    }
    for route in settings.routes:
        proxy = settings.route_egress(route).proxy_for_url(route.upstream)
        used[f"route {route.prefix}"] = proxy
    if all(proxy is None for proxy in used.values()):
        return {}
    return {
        use: "direct" if proxy is None else f"{proxy.url} ({proxy.setting})"
        for use, proxy in used.items()
    }


def register_secrets(settings: Settings) -> None:
    """The user and password of every egress proxy, for the log redactor."""
    for proxies in egress_proxies(settings).values():
        for proxy in proxies:
            for secret in proxy.secrets():
                redactor.add_secret(secret)


@dataclass(frozen=True, slots=True)
class AiohttpVia:
    """How aiohttp sends a request of one scheme through an egress proxy (or directly): the
    proxy's URL, and its Proxy-Authorization on the CONNECT for https:// (`proxy_headers`)
    or on the absolute-form request itself for http:// (`headers`)."""

    proxy: EgressProxy | None = None
    url: str | None = None
    proxy_headers: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, proxy: EgressProxy | None, scheme: str) -> AiohttpVia:
        if proxy is None:
            return cls()
        authorization = proxy.authorization
        if authorization is None:
            return cls(proxy, proxy.url)
        pair = {"Proxy-Authorization": authorization}
        if scheme == "https":
            return cls(proxy, proxy.url, proxy_headers=pair)
        return cls(proxy, proxy.url, headers=pair)


def through(proxy: EgressProxy | None) -> str:
    """' through the egress proxy ...' for a message about a request that went through it."""
    return "" if proxy is None else f" through {named(proxy)}"


def named(proxy: EgressProxy) -> str:
    return f"the egress proxy {proxy.url} ({proxy.setting})"


def unreachable(proxy: EgressProxy, target: str, exc: OSError) -> EgressProxyError:
    """No connection to the proxy itself, for the reason `exc` gives."""
    # asyncio's message ("Connect call failed (...)") says less than the errno's.
    reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
    return EgressProxyError(
        f"cannot connect to {named(proxy)}: {reason}; check that it runs and that "
        f"{proxy.setting} names it, or add {_host(target)} to NO_PROXY if it can be reached "
        "without it"
    )


def timed_out(proxy: EgressProxy, target: str, seconds: float, *, tunnel: bool) -> EgressProxyError:
    """connect_timeout passed while connecting to the proxy, or waiting for its tunnel."""
    what = f"open a tunnel to {target}" if tunnel else "accept a connection"
    return EgressProxyError(
        f"{named(proxy)} did not {what} within connect_timeout ({seconds:g} s); check that it "
        f"runs and can reach {target}"
    )


def refused(
    proxy: EgressProxy, target: str, status: int, reason: str | None, *, tunnel: bool
) -> EgressProxyError:
    """The proxy answered a CONNECT with another status than 200, or an http:// request
    with 407: it never reached upstream."""
    what = "the tunnel" if tunnel else "the request"
    return EgressProxyError(
        f"{named(proxy)} refused {what} to {target}: {status} {_reason(status, reason)}; "
        f"{_fix(proxy, target, status)}"
    )


def _fix(proxy: EgressProxy, target: str, status: int) -> str:
    # 407 is the proxy's answer to missing or wrong credentials; tinyproxy answers wrong
    # ones with 401.
    if status in {HTTPStatus.PROXY_AUTHENTICATION_REQUIRED, HTTPStatus.UNAUTHORIZED}:
        if proxy.has_credentials:
            return f"check {proxy.setting}'s user and password"
        return (
            f"it wants a user and password: write them into {proxy.setting} as "
            "http://user:password@host:port (percent-encoding any @ : / in them)"
        )
    if status == HTTPStatus.FORBIDDEN:
        return (
            f"its rules do not allow {target} (tinyproxy: ConnectPort and Filter; squid: "
            f"http_access and SSL_ports); ask its administrators, or add {_host(target)} to "
            "NO_PROXY if it can be reached without it"
        )
    if status >= 500:
        return f"the proxy could not reach {target}; check the upstream's host and port"
    return "see the egress proxy's log"


def _reason(status: int, reason: str | None) -> str:
    """The proxy's reason phrase, printable and short, else the standard one."""
    text = "".join(c for c in (reason or "") if c.isprintable())[:64].strip()
    if text:
        return text
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(no reason given)"


def target_of(url: str) -> str:
    """'https://h/token' -> 'h:443', as a CONNECT names it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host(target: str) -> str:
    """'host:port' -> 'host' (IPv6 brackets removed), as NO_PROXY would name it."""
    host = target.rpartition(":")[0] if target.count(":") == 1 or "]" in target else target
    return host.strip("[]") or target


def token_failure(exc: Exception, proxy: EgressProxy | None, url: str) -> TokenEndpointError:
    """A token request that failed at the egress proxy (aiohttp's proxy errors), as the
    TokenManager reports it: in /-/ready's last_error_description and `check`'s result."""
    error: EgressProxyError
    target = target_of(url)
    if proxy is None:
        error = EgressProxyError(f"an egress proxy failed: {type(exc).__name__}")
    elif isinstance(exc, aiohttp.ClientHttpProxyError):
        error = refused(proxy, target, exc.status, exc.message, tunnel=True)
    elif isinstance(exc, aiohttp.ClientProxyConnectionError):
        error = unreachable(proxy, target, exc.os_error)
    else:
        error = EgressProxyError(f"{named(proxy)} failed: {type(exc).__name__}")
    return TokenEndpointError(error.detail, error=EGRESS_ERROR_CODE, description=error.detail)


def token_refused(proxy: EgressProxy, url: str, status: int) -> TokenEndpointError:
    """An http:// token URL's request that the proxy answered with 407 itself."""
    detail = refused(proxy, target_of(url), status, None, tunnel=False).detail
    return TokenEndpointError(
        detail, error=EGRESS_ERROR_CODE, status_code=status, description=detail
    )
