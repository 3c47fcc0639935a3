"""The access line: one log line per forwarded request, with credentials in its targets masked.

The request path and (at debug level) the upstream URL are shown with the values of query
parameters that can carry a credential (`access_token`, `client_secret`, `code`, `api_key`,
...) masked, all else as sent."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from proxy.log import REDACTED, log_info_fast

# Names, case-insensitive, whose values can be credentials: OAuth's tokens, secrets and
# authorization codes, passwords, API keys (`key`, `api_key`, `x-api-key`, not `monkey`), and
# signed-URL signatures and session ids.
_SENSITIVE_PARAM = re.compile(
    r"token|secret|passw|pwd|credential|signature|session"
    r"|(^|[_.-])(api_?)?key($|[_.-])|^(auth_?)?code$|^auth(orization)?$|^sig$",
    re.IGNORECASE,
)
# Parameter names come from clients: remember verdicts, but never an unbounded number of them.
_MAX_REMEMBERED = 4096
_verdicts: dict[str, bool] = {}
# Whole queries found to hold nothing to mask: clients repeat the same few, and one lookup
# then replaces the walk over their parameters. Bounded in number and in length.
_MAX_REMEMBERED_QUERY = 256
_plain_queries: set[str] = set()


def mask_query(target: str) -> str:
    """`target` (a path with its query, or a URL) with sensitive parameter values masked."""
    path, mark, query = target.partition("?")
    if not mark or query in _plain_queries:
        return target  # the usual cases cost a scan or a lookup, and no allocation
    params = query.split("&")
    masked = False
    for index, param in enumerate(params):
        name, _, value = param.partition("=")
        if not value:
            continue
        verdict = _verdicts.get(name)  # looked up here: a call per parameter costs more
        if verdict is None:
            verdict = _sensitive(name)
        if verdict:
            params[index] = f"{name}={REDACTED}"
            masked = True
    if masked:
        return f"{path}?{'&'.join(params)}"
    if len(query) <= _MAX_REMEMBERED_QUERY and len(_plain_queries) < _MAX_REMEMBERED:
        _plain_queries.add(query)
    return target


def _sensitive(name: str) -> bool:
    verdict = _verdicts.get(name)
    if verdict is None:
        # Upstream decodes `access%5Ftoken` as access_token, so the check must too.
        plain = unquote(name.replace("+", " ")) if "%" in name or "+" in name else name
        verdict = _SENSITIVE_PARAM.search(plain) is not None
        if len(_verdicts) < _MAX_REMEMBERED:
            _verdicts[name] = verdict
    return verdict


def _hundredths(value: float) -> float:
    """`value` (not negative) to two decimals, as round(value, 2) writes it but for the rare
    last-digit tie: round's exact decimal conversion costs more than the rest of the line."""
    return int(value * 100 + 0.5) / 100


@dataclass(slots=True)
class Exchange:
    """What the access line reports of one forwarded request: filled by the request path
    (proxy.flow), and by the server only for a request cut short."""

    route: str = "none"
    upstream_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    replayed: bool = False
    outcome: str = "complete"
    token_age: float | None = None
    client: str = "-"
    upstream_url: str | None = None  # where the route sends it, query and all
    cache: str | None = None  # X-Cache on a route with the response cache


class AccessLog:
    """One line per forwarded request; off, or sampled, for high volume. Errors (status 400
    and above) are always written. At debug level it names the upstream URL too."""

    def __init__(
        self,
        *,
        enabled: bool,
        sample: float,
        debug: bool = False,
        rng: Callable[[], float] = random.random,
    ):
        self._enabled = enabled
        self._sample = sample
        self._debug = debug
        self._rng = rng

    def record(
        self,
        request: web.BaseRequest,
        status: int,
        duration: float,
        exchange: Exchange,
    ) -> None:
        if not self._enabled:
            return
        if status < 400 and self._sample < 1.0 and self._rng() >= self._sample:
            return
        age = exchange.token_age
        fields = {
            "method": request.method,
            "path": mask_query(request.raw_path),
            "route": exchange.route,
            "client": exchange.client,
            "status": status,
            "duration_ms": _hundredths(duration * 1000),
            "upstream_ms": _hundredths(exchange.upstream_seconds * 1000),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "token_age_s": None if age is None else int(age * 10 + 0.5) / 10,
            "replayed": exchange.replayed,
            "outcome": exchange.outcome,
        }
        if exchange.cache is not None:
            fields["cache"] = exchange.cache
        if self._debug:
            url = exchange.upstream_url
            fields["upstream_url"] = None if url is None else mask_query(url)
        # Its own keys are harmless names and its values plain: no walk, only the search.
        log_info_fast("proxy.access", "request", fields, plain=True)
