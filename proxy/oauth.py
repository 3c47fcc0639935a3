"""The client-credentials grant on the wire (RFC 6749 2.3.1, 4.4, 5.1, 5.2): the token request,
how the client authenticates, and the answer read as a token or an error reported by name."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote_plus

import aiohttp

from proxy.config import Credential
from proxy.config.egress import EgressProxy
from proxy.egress import AiohttpVia, through, token_failure, token_refused
from proxy.errors import TokenEndpointError
from proxy.log import redactor

DEFAULT_EXPIRES_IN = 3600.0
MAX_EXPIRES_IN = 365 * 24 * 3600.0
MAX_TOKEN_RESPONSE = 1024 * 1024
_DESCRIPTION_LIMIT = 200
_ERROR_LIMIT = 64


class Issued(NamedTuple):
    """What the token endpoint issued: the token, its lifetime in seconds, its scope."""

    value: str
    expires_in: float
    scope: str | None


# aiohttp's errors of a token request, most specific first: the error reported for each, and
# its detail. ServerTimeoutError is a ClientError too, and it is a timeout.
_CLIENT_ERRORS: tuple[tuple[type[Exception], str, Callable[[Exception, float], str]], ...] = (
    (
        TimeoutError,
        "timeout",
        lambda exc, timeout: f"token endpoint gave no answer within {timeout:g} s",
    ),
    (
        aiohttp.ClientError,
        "connection_error",
        lambda exc, timeout: f"cannot reach the token endpoint: {type(exc).__name__}: {exc}",
    ),
)
_TRANSLATED = tuple(kind for kind, _, _ in _CLIENT_ERRORS)
DIRECT_VIA = AiohttpVia()


async def request_token(
    session: aiohttp.ClientSession,
    credential: Credential,
    *,
    request_timeout: float,
    via: AiohttpVia | None = None,
) -> Issued:
    """One token request, as RFC 6749 4.4 describes it, directly or through the egress proxy
    `via` names; raises TokenEndpointError, whose cause is aiohttp's error when the request
    itself failed."""
    via = via if via is not None else DIRECT_VIA
    form = {"grant_type": "client_credentials"}
    if credential.scope:
        form["scope"] = credential.scope
    form.update(credential.extra_params)
    headers = {"Accept": "application/json", **via.headers}
    secret = credential.client_secret.get_secret_value()
    if credential.auth_method == "client_secret_basic":
        headers["Authorization"] = "Basic " + basic_credentials(credential.client_id, secret)
    else:
        form["client_id"] = credential.client_id
        form["client_secret"] = secret
    try:
        async with session.post(
            credential.token_url,
            data=form,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=request_timeout),
            allow_redirects=False,
            proxy=via.url,
            proxy_headers=via.proxy_headers,
        ) as response:
            body = await response.content.read(MAX_TOKEN_RESPONSE + 1)
            status, content_type = response.status, response.content_type
    except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
        raise token_failure(exc, via.proxy, credential.token_url) from exc
    except _TRANSLATED as exc:
        raise _translate(exc, request_timeout, via.proxy) from exc
    if status == 407 and via.proxy is not None:
        raise token_refused(via.proxy, credential.token_url, status)
    if len(body) > MAX_TOKEN_RESPONSE:
        raise TokenEndpointError(
            "token endpoint answered more than 1 MiB", error="invalid_response"
        )
    return Issued(*parse_token_response(status, content_type, body))


def _translate(exc: Exception, timeout: float, proxy: EgressProxy | None) -> TokenEndpointError:
    error, detail = next((e, d) for kind, e, d in _CLIENT_ERRORS if isinstance(exc, kind))
    # An error's text may quote what it was given: whatever it holds of a secret goes.
    return TokenEndpointError(redactor.scrub(detail(exc, timeout) + through(proxy)), error=error)


def parse_token_response(
    status: int, content_type: str, body: bytes
) -> tuple[str, float, str | None]:
    """Read an RFC 6749 5.1 answer, or raise TokenEndpointError for a 5.2 or malformed one."""
    try:
        payload: object = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        error = "invalid_client" if status == 401 else "invalid_response"
        raise TokenEndpointError(
            f"token endpoint answered HTTP {status} with a body that is not a JSON object "
            f"(content-type {content_type or 'none'!r})",
            error=error,
            status_code=status,
        )
    if status != 200 or "error" in payload:
        raw_error = payload.get("error")
        error = (
            redactor.scrub(raw_error)[:_ERROR_LIMIT]
            if isinstance(raw_error, str) and raw_error and raw_error.isprintable()
            else f"http_{status}"
        )
        description = _description(payload.get("error_description"))
        raise TokenEndpointError(
            f"token endpoint answered HTTP {status}: {oauth_error(error, description)}",
            error=error,
            status_code=status,
            description=description,
        )
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TokenEndpointError(
            "token endpoint answered 200 without an access_token",
            error="invalid_response",
            status_code=status,
        )
    token_type = payload.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenEndpointError(
            f"token endpoint issued a token_type of {str(token_type)[:32]!r}; only bearer "
            "tokens can be forwarded",
            error="unsupported_token_type",
            status_code=status,
        )
    expires_in = _expires_in(payload.get("expires_in"), status)
    scope = payload.get("scope")
    return access_token, expires_in, scope if isinstance(scope, str) else None


def _description(raw: Any) -> str | None:
    """The endpoint's error_description as it sent it, bounded, printable and never a secret
    (it reaches /-/ready and problem bodies, which the log's redactor does not see)."""
    if not isinstance(raw, str) or not raw:
        return None
    # Scrubbed before it is cut, so that no part of a secret is left where the cut falls.
    text = redactor.scrub(raw)
    if len(text) > _DESCRIPTION_LIMIT:
        text = text[: _DESCRIPTION_LIMIT - 1] + "\u2026"
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def oauth_error(error: str, description: str | None) -> str:
    """An OAuth error as people read it: the code, and the endpoint's description if any."""
    return error if description is None else f'{error} ("{description}")'


def _expires_in(raw: Any, status: int) -> float:
    if raw is None:
        return DEFAULT_EXPIRES_IN
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value < math.inf or isinstance(raw, bool):
        raise TokenEndpointError(
            f"token endpoint answered an expires_in of {str(raw)[:32]!r}, not a positive number",
            error="invalid_response",
            status_code=status,
        )
    # A token that claims to live for more than a year is refreshed yearly all the same.
    return min(value, MAX_EXPIRES_IN)


def secret_forms(credential: Credential) -> tuple[str, ...]:
    """The secret in every form a request shows it: plain, form-encoded, in the Basic header."""
    secret = credential.client_secret.get_secret_value()
    return secret, quote_plus(secret), basic_credentials(credential.client_id, secret)


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: id and secret are form-urlencoded, then joined and Base64-encoded."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return base64.b64encode(pair.encode()).decode()
