"""Settings: the one pydantic-settings model of the whole configuration, frozen once loaded."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.config import sources
from proxy.config.battlenet import RegionName
from proxy.config.egress import Egress, ProxyEnvironment, check_proxy_url, egress_of
from proxy.config.expand import expand
from proxy.config.messages import ENV_PREFIX, Problem, Problems, Schema, problems_of
from proxy.config.sources import read_secret_file
from proxy.config.tables import AuthMethod, Client, Credential, Route
from proxy.config.values import check_key_prefix, is_loopback_host, split_rate_limits
from proxy.store.base import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_TIMEOUT

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
MAX_WORKERS = 64
MIB = 1024 * 1024
CACHE_MAX_BYTES = 64 * MIB
CACHE_MAX_ENTRY_BYTES = 8 * MIB

_expanding: ContextVar[bool] = ContextVar("_expanding", default=False)


class Settings(BaseSettings):
    """The whole configuration, immutable once loaded."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        # A ValidationError kept as the cause of a ConfigError never quotes a value given.
        hide_input_in_errors=True,
    )

    host: str = Field(
        default="127.0.0.1",
        description="listen address; beyond loopback it needs `[[clients]]` or "
        "`allow_anonymous_remote`",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="listen port")
    workers: int = Field(
        default=1,
        description="processes serving the port together (SO_REUSEPORT), 1 to "
        f"{MAX_WORKERS}; tokens are still fetched once, rate limits split between them (shared "
        "through Redis with `redis_url`)",
    )
    client_id: str | None = Field(
        default=None,
        description="OAuth client id; defines the credential `default` and the route `/` "
        "(the single-API shorthand)",
    )
    client_secret: SecretStr | None = Field(
        default=None, description="OAuth client secret (required with `client_id`, or:)"
    )
    client_secret_file: Path | None = Field(
        default=None, description="file holding the secret; a trailing newline is stripped"
    )
    region: RegionName = Field(
        default="us", description="Battle.net preset: `us`, `eu`, `kr`, `tw`, `cn`"
    )
    upstream: str | None = Field(
        default=None,
        description="upstream base URL of the route `/`; needs `token_url` (or `region`) with it",
        json_schema_extra={
            "shown_default": "`https://{region}.api.blizzard.com` "
            "(`cn`: `https://gateway.battlenet.com.cn`)"
        },
    )
    token_url: str | None = Field(
        default=None,
        description="token endpoint; another provider's needs `upstream` (or `region`) with it",
        json_schema_extra={
            "shown_default": "`https://oauth.battle.net/token` "
            "(`cn`: `https://oauth.battlenet.com.cn/token`)"
        },
    )
    auth_method: AuthMethod = Field(
        default="client_secret_basic",
        description="`client_secret_basic` (HTTP Basic, as Battle.net documents) or "
        "`client_secret_post`",
    )
    scope: str = Field(default="", description="space-separated scopes, sent only when set")
    connect_timeout: float = Field(
        default=5.0, gt=0, description="seconds to connect upstream, then 502"
    )
    read_timeout: float = Field(
        default=60.0, gt=0, description="seconds without a byte from upstream, then 504"
    )
    token_timeout: float = Field(default=10.0, gt=0, description="seconds for one token request")
    token_wait_timeout: float = Field(
        default=10.0, gt=0, description="seconds a request waits for a token, then 503"
    )
    shutdown_timeout: float = Field(
        default=15.0,
        ge=0,
        description="seconds in-flight requests get to finish on SIGTERM or SIGINT",
    )
    max_connections: int = Field(
        default=256, ge=1, description="pooled upstream connections in all"
    )
    upstream_client: Literal["lean", "aiohttp"] = Field(
        default="lean",
        description="`lean` (the fast keep-alive HTTP/1.1 client) or `aiohttp` (its "
        "ClientSession, for what the lean one does not do)",
    )
    outbound_proxy: SecretStr | None = Field(
        default=None,
        description="egress proxy for token requests and upstreams, "
        "`http://[user:password@]host:port`; replaces HTTPS_PROXY and HTTP_PROXY, NO_PROXY "
        'still applies; `""`: none, whatever the environment says',
        json_schema_extra={"shown_default": "`HTTPS_PROXY` / `HTTP_PROXY` of the environment"},
    )
    max_body_size: int | None = Field(
        default=None,
        ge=0,
        description="largest request body in bytes, 413 beyond; unset: no limit, bodies of "
        "any size stream through",
    )
    cache: bool = Field(
        default=False,
        description="the RFC 9111 response cache (GET and HEAD, per credential) for every "
        "route; a route's own `cache` overrides it",
    )
    cache_max_bytes: int = Field(
        default=CACHE_MAX_BYTES,
        ge=1,
        description="bytes the response cache holds at most; the least recently used "
        "answers are evicted beyond",
    )
    cache_max_entry_bytes: int = Field(
        default=CACHE_MAX_ENTRY_BYTES,
        ge=1,
        description="largest answer body the cache keeps, in bytes; larger ones stream "
        "through uncached",
    )
    log_level: LogLevel = Field(default="info", description="`debug`, `info`, `warning`, `error`")
    log_format: LogFormat = Field(
        default="auto",
        description="`auto` (console on a terminal, JSON otherwise), `json`, `console`",
    )
    access_log: bool = Field(default=True, description="one log line per forwarded request")
    access_log_sample: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of successful requests logged (errors, status 400 and above, "
        "always are)",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve `/-/metrics` on this port of `host` instead of the main port",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis or Valkey shared by every replica and worker: one token fetch, one "
        "quota, one 429 pause; `redis://`, `rediss://` (TLS, verified) or `unix://`; its "
        "password is a secret",
        json_schema_extra={"shown_default": "unset (each process on its own)"},
    )
    redis_url_file: Path | None = Field(
        default=None,
        description="file holding `redis_url` (with its password); a trailing newline is stripped",
    )
    redis_timeout: float = Field(
        default=DEFAULT_REDIS_TIMEOUT,
        gt=0,
        le=10,
        description="seconds one Redis call may take; a replica whose Redis is slower or gone "
        "goes on alone, and no request waits on Redis longer",
    )
    redis_key_prefix: str = Field(
        default=DEFAULT_REDIS_PREFIX,
        description="prefix of every key in Redis, so that several teams can share one",
    )
    allow_anonymous_remote: bool = Field(
        default=False,
        description="allow a non-loopback `host` without `[[clients]]`: anyone who reaches "
        "it can use your credentials (logs a warning)",
    )
    credentials: dict[str, Credential] = Field(
        default_factory=dict, description="`[credentials.NAME]` tables, below"
    )
    routes: tuple[Route, ...] = Field(default=(), description="`[[routes]]` tables, below")
    clients: tuple[Client, ...] = Field(
        default=(), description="`[[clients]]` tables: team keys, below"
    )
    # HTTPS_PROXY, HTTP_PROXY and NO_PROXY, read when the configuration is loaded.
    _proxy_environment: ProxyEnvironment = PrivateAttr(default_factory=ProxyEnvironment.read)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return sources.settings_sources(
            settings_cls, init_settings=init_settings, secrets_settings=file_secret_settings
        )

    @field_validator("log_level", "log_format", "region", "auth_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("outbound_proxy")
    @classmethod
    def _outbound_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_proxy_url(value.get_secret_value())
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # Imported here: redis-py loads in a fifth of a second, which `health` need not pay.
        from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

        try:
            parse_redis_url(value)
        except ValueError as exc:
            # The message names the setting already; the problem's place says it again.
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value

    @field_validator("redis_key_prefix")
    @classmethod
    def _redis_key_prefix(cls, value: str) -> str:
        return check_key_prefix(value)

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if not 1 <= value <= MAX_WORKERS:
            cores = os.cpu_count() or 1
            raise ValueError(
                f"{value} is not between 1 and {MAX_WORKERS}; use about one worker per CPU "
                f"core (this machine has {cores}), or 1 for a single process"
            )
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Expand the single-API shorthand, then report every problem at once: those of the
        configuration as a whole, found on the values as given, with those of each setting."""
        if not isinstance(data, dict) or _expanding.get():
            return handler(data)
        from_file = data.get("redis_url_file") is not None and data.get("redis_url") is None
        data, found_file = _read_redis_url_file(data)
        expanded = expand(data, fields=cls.model_fields)
        expanded.problems[:0] = found_file
        # model_validate goes through BaseSettings.__init__, which validates the expanded
        # data once more: that pass must not expand it again.
        reset = _expanding.set(True)
        try:
            settings = handler(expanded.data)
        except ValidationError as exc:
            found = [expanded.relocate(p) for p in problems_of(exc, schema=SCHEMA)]
            if from_file:
                found = [_in_redis_url_file(p) for p in found]
            raise Problems([*expanded.problems, *found]) from exc
        finally:
            _expanding.reset(reset)
        if expanded.problems:
            raise Problems(expanded.problems)
        return settings

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems: list[Problem] = []
        digests = [client.digest for client in self.clients]
        if len(set(digests)) != len(digests):
            problems.append(Problem(("clients",), "two clients share one key; give each its own"))
        if self.workers > 1 and not self.limits_shared:
            problems += self._split_limit_problems()
        problems += self._egress_problems()
        entry_bound_set = "cache_max_entry_bytes" in self.model_fields_set
        if entry_bound_set and self.cache_max_entry_bytes > self.cache_max_bytes:
            problems.append(
                Problem(
                    ("cache_max_entry_bytes",),
                    f"{self.cache_max_entry_bytes} is more than {{cache_max_bytes}} "
                    f"({self.cache_max_bytes}), which must hold an answer of that size; lower "
                    "it, or raise {cache_max_bytes}",
                    template=True,
                )
            )
        if problems:
            raise Problems(problems)
        return self

    def _split_limit_problems(self) -> list[Problem]:
        import limits  # noqa: PLC0415  (only with a rate limit set: 2 MiB, 80 ms at start-up)

        tables: list[tuple[tuple[str | int, ...], tuple[str, ...]]] = [
            (("credentials", name, "rate_limit"), credential.rate_limits)
            for name, credential in self.credentials.items()
        ]
        tables += [(("clients", i, "rate_limit"), c.rate_limit) for i, c in enumerate(self.clients)]
        return [
            Problem(
                loc,
                f"{value!r} cannot be split between {self.workers} workers ({{workers}}): each "
                "would get less than one request; lower {workers}, or count the limit over a "
                'longer window (e.g. "60/minute" rather than "1/second")',
                template=True,
            )
            for loc, values in tables
            for value in values
            if limits.parse(value).amount < self.workers
        ]

    def _egress_problems(self) -> list[Problem]:
        """A proxy variable of the environment that is not a proxy URL, when anything uses it
        (a setting's own URL is checked by its validator)."""
        try:
            for name in self.credentials:
                self.credential_egress(name)
            for route in self.routes:
                self.route_egress(route)
        except ValueError as exc:
            fix = 'or set outbound_proxy, which replaces it ("" for none)'
            return [Problem((), f"{exc}; {fix}", where="")]
        return []

    def credential_egress(self, name: str) -> Egress:
        """Where the token requests of credential `name` go: its own outbound_proxy, else the
        top-level one, else the environment's proxy variables."""
        own = self.credentials[name].outbound_proxy
        if own is None:
            return self._egress()
        setting = f"credentials.{name}.outbound_proxy"
        return egress_of(
            own.get_secret_value(), setting=setting, environment=self._proxy_environment
        )

    def route_egress(self, route: Route) -> Egress:
        """Where the requests of `route` (one of `routes`) go, as credential_egress."""
        if route.outbound_proxy is None:
            return self._egress()
        index = next(i for i, known in enumerate(self.routes) if known.prefix == route.prefix)
        return egress_of(
            route.outbound_proxy.get_secret_value(),
            setting=f"routes[{index}].outbound_proxy",
            environment=self._proxy_environment,
        )

    def _egress(self) -> Egress:
        top = self.outbound_proxy
        return egress_of(
            None if top is None else top.get_secret_value(),
            setting="outbound_proxy",
            environment=self._proxy_environment,
        )

    @property
    def limits_shared(self) -> bool:
        """Whether rate limits are counted in Redis, where every worker and replica shares
        them whole, rather than in each process."""
        return self.redis_url is not None

    def split_limits(self) -> tuple[dict[str, Credential], tuple[Client, ...]]:
        """The credentials and clients with every rate limit divided between the workers
        (rounded down, so that together they never exceed it): one worker's share. Limits
        counted in Redis stay whole."""
        if self.limits_shared:
            return dict(self.credentials), self.clients
        ways = self.workers
        credentials = {
            name: credential.model_copy(
                update={"rate_limit": split_rate_limits(credential.rate_limits, ways)}
            )
            for name, credential in self.credentials.items()
        }
        clients = tuple(
            client.model_copy(update={"rate_limit": split_rate_limits(client.rate_limit, ways)})
            for client in self.clients
        )
        return credentials, clients

    @property
    def exposed_anonymously(self) -> bool:
        """Listening beyond loopback with no team keys to keep strangers out."""
        return not is_loopback_host(self.host) and not self.clients

    @property
    def cache_entry_limit(self) -> int:
        """The largest body the cache keeps: cache_max_entry_bytes, within cache_max_bytes
        when only that one was set."""
        return min(self.cache_max_entry_bytes, self.cache_max_bytes)

    def caches(self, route: Route) -> bool:
        """Whether answers on `route` go through the response cache (its own `cache` key,
        else the top-level one)."""
        return self.cache if route.cache is None else route.cache

    @property
    def routes_by_length(self) -> tuple[Route, ...]:
        """Routes with the longest prefix first, the order in which they are matched."""
        return tuple(sorted(self.routes, key=lambda r: len(r.match_prefix), reverse=True))


def _in_redis_url_file(problem: Problem) -> Problem:
    """A problem of the redis_url read from redis_url_file, told at the file's setting."""
    if problem.loc != ("redis_url",):
        return problem
    return Problem(("redis_url_file",), f"the URL it holds: {problem.message}")


def _read_redis_url_file(data: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The settings with redis_url read from redis_url_file, or the problem with the file."""
    path = data.get("redis_url_file")
    if path is None:
        return data, []
    if data.get("redis_url") is not None:
        return data, [Problem(("redis_url_file",), "is set and so is redis_url; keep only one")]
    if not isinstance(path, str | Path):
        return data, []  # pydantic says what it should be
    try:
        url = read_secret_file(Path(path), what="the Redis URL")
    except ValueError as exc:
        return data, [Problem(("redis_url_file",), str(exc))]
    return {**data, "redis_url": url}, []


SCHEMA = Schema(
    top=Settings, named={"credentials": Credential}, listed={"routes": Route, "clients": Client}
)
