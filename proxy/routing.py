"""The route table: longest prefix first, prefix stripped and joined to the upstream's base
path byte for byte, and `..` segments that would climb above the prefix refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from proxy.config import Route
from proxy.errors import BadRequest, NoRoute


class Match(NamedTuple):
    """A route chosen for a request, and the upstream target (path and query, still encoded).
    (A named tuple: made on every request, it costs less than a frozen dataclass.)"""

    route: Route
    target: str


class RouteTable:
    """Finds the route of a raw request target; configuration alone decides the upstream."""

    def __init__(self, routes: Sequence[Route]) -> None:
        ordered = sorted(routes, key=lambda r: len(r.match_prefix), reverse=True)
        self._routes = tuple((r.match_prefix, r.upstream.rstrip("/"), r) for r in ordered)

    def match(self, raw_target: str) -> Match:
        if not raw_target.startswith("/"):
            raise BadRequest(
                "only origin-form request targets (/path?query) are accepted; "
                "point your client at the proxy as if it were the API"
            )
        if "#" in raw_target:
            # Origin-form has no fragment (RFC 9112 3.2.1); what follows '#' would be dropped
            # on the way upstream, and with it whatever the safety checks saw.
            raise BadRequest("a request target must not carry a fragment ('#')")
        path, sep, query = raw_target.partition("?")
        for prefix, base, route in self._routes:
            if prefix and path != prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) :]
            _refuse_climbing(rest)
            return Match(route=route, target=base + rest + sep + query)
        raise NoRoute("no route matches this path; check the prefixes in [[routes]]")


def _refuse_climbing(path: str) -> None:
    if "." not in path and "%2e" not in path and "%2E" not in path:
        return  # no dot segment, plain or encoded: nothing can climb
    depth = 0
    for segment in path.split("/"):
        plain = segment.replace("%2e", ".").replace("%2E", ".")
        if plain == "..":
            depth -= 1
            if depth < 0:
                raise BadRequest("the path climbs above its route prefix with '..'")
        elif plain not in {"", "."}:
            depth += 1
