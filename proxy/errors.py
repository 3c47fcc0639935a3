"""The one exception tree of token-proxy: every error it raises on purpose, and what each becomes.

ProxyError                 answered as problem+json: status, title, detail, its headers
├── ConfigError            bad configuration (CLI exit 2, never served)
├── BadRequest             400 malformed or unsafe request
├── Unauthorized           401 team key missing or wrong (WWW-Authenticate)
├── NoRoute                404 no route matches the path
├── MethodNotAllowed       405 a reserved /-/ path asked with a method other than GET or HEAD
├── PayloadTooLarge        413 request body over max_body_size
├── RateLimited            429 no rate-limit slot within rate_limit_max_wait (Retry-After)
├── TokenUnavailable       503 no usable token within the wait (Retry-After)
│   └── ClientRejected     503 the token endpoint rejected the client credentials
├── UpstreamBusy           503 every connection the route may use stayed busy (Retry-After)
├── NotCached              504 `Cache-Control: only-if-cached` and no stored answer fits
├── TokenEndpointError     a token request failed (logged, retried; never served directly)
└── UpstreamError          502 upstream unreachable or broken
    ├── EgressProxyError   502 the egress proxy is unreachable or refused the request
    └── UpstreamTimeout    504 no byte from upstream within read_timeout
StoreUnavailable           a shared store (Redis) failed; never served: the fallback store
                           answers from memory instead (so not a ProxyError, which would be)

Third-party errors become these at the boundary where they enter, each boundary through one
table, keeping the cause (`raise ... from exc`), as httpx's _exceptions.py does:
    transports: aiohttp, httptools, OSError, ssl   UpstreamError, UpstreamTimeout, UpstreamBusy
    the token request: aiohttp, the answer's JSON  TokenEndpointError
    settings: pydantic's ValidationError, TOML     ConfigError
    redis-py (proxy.store.redis_calls)             StoreUnavailable

Messages never carry a token, a secret, a request body or request headers. A kept cause may:
the log chain renders tracebacks, causes and contexts included, before it redacts them
(proxy.log; tests/test_log.py proves a chained cause leaks nothing).
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error token-proxy raises on purpose."""

    status: int = 500
    title: str = "Internal proxy error"
    type_slug: str = "internal"
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class ConfigError(ProxyError):
    """The configuration cannot be used; the message names the setting and the fix."""

    title = "Configuration error"
    type_slug = "config"


class BadRequest(ProxyError):
    status = 400
    title = "Bad request"
    type_slug = "bad-request"


class Unauthorized(ProxyError):
    """Team mode: the request carries no team key, or one that is not known."""

    status = 401
    title = "Team key missing or wrong"
    type_slug = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="token-proxy"'}


class NoRoute(ProxyError):
    status = 404
    title = "No route"
    type_slug = "no-route"


class MethodNotAllowed(ProxyError):
    status = 405
    title = "Method not allowed"
    type_slug = "method-not-allowed"

    def __init__(self, detail: str, *, allow: str) -> None:
        super().__init__(detail)
        self.allow = allow

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class ExpectationFailed(ProxyError):
    """An Expect header other than 100-continue (RFC 9110 10.1.1)."""

    status = 417
    title = "Expectation failed"
    type_slug = "expectation-failed"


class PayloadTooLarge(ProxyError):
    status = 413
    title = "Request body too large"
    type_slug = "payload-too-large"


class RateLimited(ProxyError):
    status = 429
    title = "Rate limit wait exceeded"
    type_slug = "rate-limited"
    retry_after: int

    def __init__(self, detail: str, *, retry_after: int, limit: str) -> None:
        """`limit`: which limit refused, `credential` or `client` (the metric's label)."""
        super().__init__(detail)
        self.retry_after = retry_after
        self.limit = limit


class TokenUnavailable(ProxyError):
    status = 503
    title = "No usable access token"
    type_slug = "token-unavailable"
    retry_after: int

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ClientRejected(TokenUnavailable):
    title = "Client credentials rejected"
    type_slug = "client-rejected"


class UpstreamBusy(ProxyError):
    """Every upstream connection a route may use stayed busy for connect_timeout."""

    status = 503
    title = "Upstream connections busy"
    type_slug = "upstream-busy"
    retry_after = 1


class NotCached(ProxyError):
    """The client asked for a stored answer only (only-if-cached) and none fits (RFC 9111
    §5.2.1.7)."""

    status = 504
    title = "Not in the cache"
    type_slug = "not-cached"


class TokenEndpointError(ProxyError):
    """A token request failed; `error` is the RFC 6749 5.2 code or a short failure name, and
    `description` the endpoint's error_description when it sent one."""

    status = 503
    title = "Token endpoint error"
    type_slug = "token-endpoint"

    def __init__(
        self,
        detail: str,
        *,
        error: str,
        status_code: int | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.error = error
        self.status_code = status_code
        self.description = description

    @property
    def rejects_client(self) -> bool:
        return self.error in {"invalid_client", "unauthorized_client"}


class UpstreamError(ProxyError):
    status = 502
    title = "Upstream unreachable"
    type_slug = "upstream-unreachable"


class EgressProxyError(UpstreamError):
    """The egress proxy (outbound_proxy, HTTPS_PROXY) could not be reached, or refused to
    carry the request; the message names the proxy, not the upstream."""

    title = "Egress proxy unreachable or refusing"
    type_slug = "egress-proxy"


class UpstreamTimeout(UpstreamError):
    status = 504
    title = "Upstream timeout"
    type_slug = "upstream-timeout"


class StoreUnavailable(Exception):
    """A shared store did not answer within its timeout, or answered with an error.

    `kind` names the failure for metrics (timeout, connection, auth, response, other); the
    message never holds a value that was stored, nor the store's password."""

    def __init__(self, detail: str, *, kind: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.kind = kind
