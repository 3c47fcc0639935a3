"""The configuration as a whole: the shorthand expanded, and what no single key can get wrong."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from proxy.config.battlenet import REGION_UPSTREAMS, battlenet_region, is_battlenet_token_url
from proxy.config.messages import Problem, literal, suggest
from proxy.config.values import is_loopback_host

# Keys that only make sense for the single-API shorthand (no [credentials.*] of their own).
SHORTHAND_CREDENTIAL_KEYS = (
    "client_secret",
    "client_secret_file",
    "token_url",
    "auth_method",
    "scope",
)
# Settings of the shorthand's credential and route, moved back to the key that set them.
_FROM_SHORTHAND = frozenset({"client_id", "region", *SHORTHAND_CREDENTIAL_KEYS})
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def _field(table: Any, key: str) -> Any:
    """A key of a table as given, or None when the table is not one (pydantic says so)."""
    return table.get(key) if isinstance(table, dict) else None


@dataclass(frozen=True)
class Expanded:
    """The settings as given with the shorthand's credential and routes added, and what is
    wrong with them as a whole."""

    data: dict[str, Any]
    problems: list[Problem]
    shorthand: bool = False  # credentials.default was made from the top-level keys
    shorthand_route: bool = False  # and routes[0] from the top-level upstream

    def relocate(self, problem: Problem) -> Problem:
        """A problem of the shorthand's credential or route, told at the key that set it."""
        if not self.shorthand:
            return problem
        if problem.loc == ("credentials", "default", "client_secret") and problem.missing:
            return Problem(
                ("client_secret",),
                "is not set; set TOKEN_PROXY_CLIENT_SECRET_FILE (or TOKEN_PROXY_CLIENT_SECRET) in "
                "the environment, put the secret in the file token_proxy_client_secret of the "
                "secrets directory, or set client_secret_file in the config file",
                where="client_secret",
                missing=frozenset({("client_secret",), ("client_secret_file",)}),
            )
        return Problem(
            self._lift(problem.loc),
            problem.message,
            where=problem.where,
            missing=frozenset(self._lift(loc) for loc in problem.missing),
            covers=None if problem.covers is None else self._lift(problem.covers),
            template=problem.template,
        )

    def _lift(self, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
        if loc[:2] == ("credentials", "default") and len(loc) > 2 and loc[2] in _FROM_SHORTHAND:
            return loc[2:]
        if self.shorthand_route and loc[:3] == ("routes", 0, "upstream"):
            return loc[2:]
        return loc


def expand(given: dict[str, Any], *, fields: Mapping[str, FieldInfo]) -> Expanded:
    """Add the shorthand's credential `default` and route `/`, and each credential's region
    routes; check what no single key can (names that refer to each other, the token URL)."""
    data = dict(given)
    credentials = data.get("credentials") or {}
    routes = data.get("routes") or []
    if not isinstance(credentials, dict) or not isinstance(routes, list | tuple):
        return Expanded(data, [])  # pydantic says what they should be
    credentials, routes = dict(credentials), list(routes)
    problems: list[Problem] = []
    client_id = data.get("client_id")
    explicit_region = data.get("region") is not None
    region = str(data.get("region") or "us").lower()
    shorthand = shorthand_route = conflict = False
    if client_id == "":
        problems.append(
            Problem(
                ("client_id",), "is empty; set it to your OAuth client id", covers=("client_id",)
            )
        )
    elif client_id is not None and "default" in credentials:
        conflict = True
        problems.append(
            Problem(
                ("client_id",),
                "defines the credential 'default' (the single-API shorthand), and the config "
                "file has a [credentials.default] table too; keep one",
            )
        )
    elif client_id is not None:
        shorthand = True
        shorthand_keys = {k: data[k] for k in SHORTHAND_CREDENTIAL_KEYS if data.get(k) is not None}
        credentials["default"] = {"client_id": client_id, **shorthand_keys}
        if region in REGION_UPSTREAMS:
            credentials["default"]["region"] = region
        if not explicit_region:
            problems += _shorthand_provider(data, routes=bool(routes), region=region)
        if not routes:
            upstream = data.get("upstream") or REGION_UPSTREAMS.get(region, "https://invalid")
            routes = [{"prefix": "/", "upstream": upstream, "credential": "default"}]
            shorthand_route = True
    else:
        problems += _stray_shorthand_keys(data, fields)
        if not credentials:
            problems.append(_no_credentials(routes))
    routes += _region_routes(credentials)
    if credentials and not routes and not conflict:
        problems.append(
            Problem(
                ("routes",),
                "no routes are configured; add a [[routes]] table with prefix, upstream and "
                "credential to the config file (or region_routes to a Battle.net credential)",
                where="",
                missing=frozenset({("routes",)}),
            )
        )
    problems += _route_problems(routes, credentials)
    # The shorthand's own route and an explicit region are checked by _shorthand_provider.
    checked_default = shorthand and not explicit_region and not shorthand_route
    problems += _token_url_problems(
        credentials,
        routes,
        skip="default" if shorthand and not checked_default else None,
        shorthand="default" if checked_default else None,
    )
    problems += _client_problems(data.get("clients"))
    problems += _exposure_problems(data, fields)
    data["credentials"] = credentials
    data["routes"] = routes
    return Expanded(data, problems, shorthand, shorthand_route)


def _shorthand_provider(data: dict[str, Any], *, routes: bool, region: str) -> list[Problem]:
    """Without an explicit region, the shorthand takes Battle.net's token URL and API only as
    a pair: another provider's secret must never reach Battle.net's token endpoint."""
    upstream, token_url = data.get("upstream"), data.get("token_url")
    if upstream is not None and token_url is None:
        hint = battlenet_region(upstream)
        fix = (
            f'it is Battle.net\'s {hint} API: set {{region="{hint}"}}'
            if hint
            else "set {token_url} to the token endpoint of this API's provider (or {region}, "
            "if it is a Battle.net API)"
        )
        message = (
            "is set but {token_url} is not, and the client secret must not go to Battle.net's "
            f"token endpoint for another provider's API; {fix}"
        )
        missing = frozenset({("token_url",), ("region",)})
        return [Problem(("upstream",), message, missing=missing, template=True)]
    if token_url is not None and upstream is None and not routes:
        if is_battlenet_token_url(token_url):
            return []
        message = (
            "is set but {upstream} is not, so requests would go to Battle.net's API "
            f"({REGION_UPSTREAMS.get(region, '?')}) with this endpoint's tokens; set {{upstream}} "
            "to the API's base URL (or {region}, if this token endpoint serves Battle.net)"
        )
        missing = frozenset({("upstream",), ("region",)})
        return [Problem(("token_url",), message, missing=missing, template=True)]
    return []


def _stray_shorthand_keys(data: dict[str, Any], fields: Mapping[str, FieldInfo]) -> list[Problem]:
    problems = []
    for key in (*SHORTHAND_CREDENTIAL_KEYS, "upstream"):
        if data.get(key) in (None, "", fields[key].default):
            continue
        table = "a [[routes]] entry" if key == "upstream" else "a [credentials.NAME] table"
        problems.append(
            Problem(
                (key,),
                "applies only together with {client_id} (the single-API shorthand); set "
                f"{{client_id}} too, or move it into {table}",
                covers=("client_id",),
                template=True,
            )
        )
    return problems


def _no_credentials(routes: list[Any]) -> Problem:
    named = sorted({name for r in routes if isinstance(name := _field(r, "credential"), str)})
    if named:
        message = (
            f"no credentials are configured, but [[routes]] name {', '.join(map(repr, named))}; "
            "add a [credentials.NAME] table for each to the config file"
        )
    else:
        message = (
            "no credentials are configured; set TOKEN_PROXY_CLIENT_ID and "
            "TOKEN_PROXY_CLIENT_SECRET (or TOKEN_PROXY_CLIENT_SECRET_FILE), "
            "or add a [credentials.NAME] table to the config file"
        )
    missing = frozenset({("credentials",), ("client_id",)})
    return Problem(("credentials",), message, where="", missing=missing)


def _region_routes(credentials: dict[str, Any]) -> list[dict[str, Any]]:
    routes = []
    for name, table in credentials.items():
        regions = table.get("region_routes", ()) if isinstance(table, dict) else ()
        for region in regions if isinstance(regions, list | tuple) else ():
            if region in REGION_UPSTREAMS:
                upstream = REGION_UPSTREAMS[region]
                routes.append({"prefix": f"/{region}/", "upstream": upstream, "credential": name})
    return routes


def _route_problems(routes: list[Any], credentials: dict[str, Any]) -> list[Problem]:
    problems = []
    for index, route in enumerate(routes):
        name = route.get("credential") if isinstance(route, dict) else None
        if isinstance(name, str) and credentials and name not in credentials:
            known = ", ".join(sorted(credentials))
            hint = suggest(name, credentials)
            fix = f"; did you mean {hint!r}?" if hint else ""
            problems.append(
                Problem(
                    ("routes", index, "credential"),
                    f"{name!r} names no credential; defined credentials: {known}{fix}",
                )
            )
    prefixes = [
        r["prefix"].rstrip("/")
        for r in routes
        if isinstance(r, dict) and isinstance(r.get("prefix"), str)
    ]
    for prefix in sorted({p for p in prefixes if prefixes.count(p) > 1}):
        problems.append(
            Problem(
                ("routes",),
                f"the prefix {prefix or '/'!r} is used by more than one route; keep one",
            )
        )
    return problems


def _token_url_problems(
    credentials: dict[str, Any], routes: list[Any], *, skip: str | None, shorthand: str | None
) -> list[Problem]:
    """A credential without token_url or region gets Battle.net's token URL: refused when
    its token would go to an API that is not Battle.net's (or to none), as its secret is
    probably another provider's. `shorthand` names the credential made from top-level keys,
    reported there."""
    named = [_field(route, "credential") for route in routes]
    unresolved = any(isinstance(n, str) and n not in credentials for n in named)
    problems = []
    for name, table in credentials.items():
        if name == skip or not isinstance(table, dict) or table.get("token_url") is not None:
            continue
        said = table.get("region") is not None or table.get("region_routes")
        if said and name != shorthand:  # the shorthand's region is the default one
            continue
        used = [i for i, n in enumerate(named) if n == name]
        foreign = [i for i in used if battlenet_region(routes[i].get("upstream")) is None]
        if foreign:
            # Only the host: a URL may carry a password (refused, but never shown).
            host = urlsplit(str(routes[foreign[0]].get("upstream"))).hostname
            why = f"but routes[{foreign[0]}] sends its token to {literal(host)}"
        elif not used and routes and not unresolved:
            why = "and no route uses this credential"
        else:
            continue
        loc: tuple[str | int, ...] = ("credentials", name, "token_url")
        token_url, region = "token_url", "region"
        if name == shorthand:
            loc, token_url, region = ("token_url",), "{token_url}", "{region}"
        message = (
            "is not set, so the client secret would be sent to Battle.net's token endpoint, "
            f"{why}; set {token_url} to the provider's token endpoint (or {region}, if this "
            "is a Battle.net client)"
        )
        missing = frozenset({loc, (*loc[:-1], "region")})
        problems.append(Problem(loc, message, missing=missing, template=len(loc) == 1))
    return problems


def _client_problems(clients: Any) -> list[Problem]:
    if not isinstance(clients, list | tuple):
        return []
    names = [name for c in clients if isinstance(name := _field(c, "name"), str)]
    return [
        Problem(("clients",), f"the name {name!r} is used more than once; give each client its own")
        for name in sorted({n for n in names if names.count(n) > 1})
    ]


def _exposure_problems(data: dict[str, Any], fields: Mapping[str, FieldInfo]) -> list[Problem]:
    host = data.get("host", fields["host"].default)
    if not isinstance(host, str) or is_loopback_host(host) or data.get("clients"):
        return []
    try:
        if _BOOL.validate_python(data.get("allow_anonymous_remote", False)):
            return []
    except ValidationError:
        return []  # the key's own problem says what it should be
    return [
        Problem(
            ("host",),
            f"{literal(host)} is not a loopback address and no [[clients]] are configured, so "
            "anyone who can reach it could use your credentials; listen on 127.0.0.1, add "
            "[[clients]] with team keys, or set {allow_anonymous_remote=true} if that is "
            "really intended",
            template=True,
        )
    ]
