"""Settings: one pydantic-settings model read from flags, environment, secrets directory,
TOML file and defaults (highest first), and the checks that turn a bad configuration into a
message that names the setting and says how to fix it."""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from proxy.errors import ConfigError

ENV_PREFIX = "TOKEN_PROXY_"
DEFAULT_SECRETS_DIR = Path("/run/secrets")

RegionName = Literal["us", "eu", "kr", "tw", "cn"]
AuthMethod = Literal["client_secret_basic", "client_secret_post"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

BATTLENET_TOKEN_URL = "https://oauth.battle.net/token"  # noqa: S105  (a URL, not a password)
REGION_TOKEN_URLS: dict[str, str] = {
    "us": BATTLENET_TOKEN_URL,
    "eu": BATTLENET_TOKEN_URL,
    "kr": BATTLENET_TOKEN_URL,
    "tw": BATTLENET_TOKEN_URL,
    "cn": "https://oauth.battlenet.com.cn/token",
}
REGION_UPSTREAMS: dict[str, str] = {
    "us": "https://us.api.blizzard.com",
    "eu": "https://eu.api.blizzard.com",
    "kr": "https://kr.api.blizzard.com",
    "tw": "https://tw.api.blizzard.com",
    "cn": "https://gateway.battlenet.com.cn",
}

BATTLENET_TOKEN_HOSTS = frozenset({"oauth.battle.net", "oauth.battlenet.com.cn"})
# Battle.net's published API quota for a client.
BATTLENET_RATE_LIMIT = ("100/second", "36000/hour")


def check_rate_limits(values: tuple[str, ...]) -> tuple[str, ...]:
    """Validate limits such as "100/second" or "36000/hour" with the `limits` library's parser."""
    for value in values:
        try:
            limits.parse(value)
        except ValueError:
            raise ValueError(
                f'rate limit {value!r} is not understood; write it like "100/second", '
                '"20/minute" or "36000/hour"'
            ) from None
    return values


def split_rate_limits(values: tuple[str, ...], ways: int) -> tuple[str, ...]:
    """Each limit divided `ways` ways, rounded down: "100/second" in 3 is "33 per 1 second"."""
    items = (limits.parse(value) for value in values)
    return tuple(
        f"{item.amount // ways} per {item.multiples} {item.GRANULARITY.name}" for item in items
    )


# Keys that only make sense for the single-API shorthand (no [credentials.*] of their own).
_SHORTHAND_CREDENTIAL_KEYS = (
    "client_secret",
    "client_secret_file",
    "token_url",
    "auth_method",
    "scope",
)
MAX_WORKERS = 64
# Environment variables read by the loader itself rather than by the model.
_LOADER_ENV = {"CONFIG", "SECRETS_DIR"}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, what: str, allow_path: bool = True) -> str:
    """Validate an upstream or token URL: https, or http on a loopback host only."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL; write it as https://host[/path]")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed; use client_id/client_secret")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"{value!r} uses plain http to a host that is not loopback, which would send "
            "the token in clear text; use https://"
        )
    if parts.fragment or (not allow_path and parts.query):
        raise ValueError(f"{value!r} must not carry a query or fragment")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credential(_Model):
    """One OAuth client: where its token comes from and how the client authenticates."""

    client_id: str = Field(min_length=1, description="OAuth client id (required)")
    client_secret: SecretStr = Field(description="OAuth client secret (this or the file)")
    client_secret_file: Path | None = Field(
        default=None, description="file holding the secret; a trailing newline is stripped"
    )
    region: RegionName | None = Field(
        default=None, description="Battle.net preset for `token_url`: `us`, `eu`, `kr`, `tw`, `cn`"
    )
    token_url: str = Field(
        description="token endpoint",
        json_schema_extra={"shown_default": "the region's, else `https://oauth.battle.net/token`"},
    )

    @field_validator("region", "auth_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    auth_method: AuthMethod = Field(
        default="client_secret_basic",
        description="`client_secret_basic` or `client_secret_post`",
    )
    scope: str = Field(default="", description="space-separated scopes, sent only when set")
    extra_params: dict[str, str] = Field(
        default_factory=dict,
        description='more form fields for the token request, e.g. `{ audience = "..." }`',
    )
    rate_limit: tuple[str, ...] | None = Field(
        default=None,
        description="limits shared by every request with this credential, e.g. "
        '`["100/second", "36000/hour"]`; `[]` for none',
        json_schema_extra={
            "shown_default": "Battle.net's quota for a Battle.net `token_url`, else none"
        },
    )
    rate_limit_max_wait: float = Field(
        default=5.0, ge=0, description="seconds a request may queue for the limit, then 429"
    )
    region_routes: tuple[RegionName, ...] = Field(
        default=(),
        description="Battle.net regions to route for this credential: `/us/`, `/eu/`, ...",
    )

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_rate_limits(value)

    @property
    def is_battlenet(self) -> bool:
        return urlsplit(self.token_url).hostname in BATTLENET_TOKEN_HOSTS

    @property
    def rate_limits(self) -> tuple[str, ...]:
        """The limits in force: as set, or Battle.net's published quota for Battle.net."""
        if self.rate_limit is not None:
            return self.rate_limit
        return BATTLENET_RATE_LIMIT if self.is_battlenet else ()

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("token_url") is None:
            region = str(data.get("region") or "us").lower()
            data["token_url"] = REGION_TOKEN_URLS.get(region, BATTLENET_TOKEN_URL)
        secret_file = data.get("client_secret_file")
        if secret_file is not None:
            if data.get("client_secret") is not None:
                raise ValueError("both client_secret and client_secret_file are set; keep only one")
            data["client_secret"] = _read_secret_file(Path(secret_file))
        elif data.get("client_secret") is None:
            raise ValueError(
                "client_secret is missing; set client_secret or client_secret_file "
                "(environment: TOKEN_PROXY_CLIENT_SECRET or TOKEN_PROXY_CLIENT_SECRET_FILE)"
            )
        return data

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, value: str) -> str:
        return check_url(value, what="token_url")

    @model_validator(mode="after")
    def _regions_share_a_token_url(self) -> Credential:
        mixed = [r for r in self.region_routes if REGION_TOKEN_URLS[r] != self.token_url]
        if self.region_routes and mixed:
            raise ValueError(
                f"region_routes {', '.join(mixed)} need the token URL "
                f"{REGION_TOKEN_URLS[mixed[0]]}, not {self.token_url}; give them a credential "
                "of their own (Battle.net China has its own accounts)"
            )
        return self

    @field_validator("client_secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("client_secret is empty")
        return value


def _read_secret_file(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"client_secret_file {str(path)!r} cannot be read ({exc.strerror}); "
            "check the path and that token-proxy's user may read it"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"client_secret_file {str(path)!r} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"client_secret_file {str(path)!r} is empty")
    return secret


class Route(_Model):
    """A path prefix forwarded to one upstream with one credential's token."""

    prefix: str = Field(description="path prefix, stripped before forwarding; longest wins")
    upstream: str = Field(description="upstream base URL; https, except loopback hosts")
    credential: str = Field(description="name of the `[credentials.NAME]` whose token to send")
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="requests upstream at once on this route; more wait up to "
        "`connect_timeout`, then 503",
    )
    ca_bundle: Path | None = Field(
        default=None, description="PEM file of CAs to verify this upstream with"
    )

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=str(value))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"ca_bundle {str(value)!r} is not a readable PEM file of CA certificates "
                    f"({exc}); fix the path, or remove the key to use the system's"
                ) from None
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"prefix {value!r} must start with '/'")
        if value.startswith("/-/"):
            raise ValueError("prefixes under /-/ are reserved for the proxy's own endpoints")
        segments = value.split("/")
        if any(seg in {".", ".."} for seg in segments):
            raise ValueError(f"prefix {value!r} must not contain '.' or '..' segments")
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        return check_url(value, what="upstream", allow_path=False)

    @property
    def match_prefix(self) -> str:
        """The prefix without its trailing slash: '' for the root route."""
        return self.prefix.rstrip("/")


MIN_KEY_LENGTH = 16
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Client(_Model):
    """A team member's tool allowed to use the proxy, known by the sha256 of its key."""

    name: str = Field(description="shown in logs and metrics; letters, digits, `.`, `_`, `-`")
    key: SecretStr | None = Field(
        default=None, description="the team key itself (16+ characters), or:"
    )
    key_sha256: str | None = Field(
        default=None, description="hex sha256 of the key, from `token-proxy hash-key`"
    )
    rate_limit: tuple[str, ...] = Field(
        default=(), description='this client\'s own limits, e.g. `["20/second"]`'
    )
    rate_limit_max_wait: float = Field(
        default=5.0, ge=0, description="seconds its requests may queue, then 429"
    )

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_rate_limits(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CLIENT_NAME.fullmatch(value):
            raise ValueError(
                f"client name {value!r} must be 1 to 64 letters, digits, '.', '_' or '-' "
                "(it becomes a metric label)"
            )
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() != value.get_secret_value().strip():
            raise ValueError("key starts or ends with white space, which no client can send")
        if value is not None and len(value.get_secret_value()) < MIN_KEY_LENGTH:
            raise ValueError(
                f"key is shorter than {MIN_KEY_LENGTH} characters; use a random one, "
                "e.g. from `openssl rand -hex 32`"
            )
        return value

    @field_validator("key_sha256")
    @classmethod
    def _key_sha256(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.strip().lower()
            if not _SHA256_HEX.fullmatch(value):
                raise ValueError(
                    "key_sha256 must be 64 hex digits; make it with `token-proxy hash-key`"
                )
        return value

    @model_validator(mode="after")
    def _one_key(self) -> Client:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"client {self.name!r}: set exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> bytes:
        """The sha256 of the client's key, the only form in which it is compared."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        if self.key is None:
            raise RuntimeError("a client without a key cannot be built")
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


_toml_data: ContextVar[dict[str, Any]] = ContextVar("_toml_data", default={})  # noqa: B039  (read-only default)


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file's contents, already parsed by load_settings (so parse errors are ours)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get())


_SECRET_KEYS = ("client_secret", "client_secret_file")


class _YieldSecret(PydanticBaseSettingsSource):
    """A source whose secret (value or file) gives way to one from any higher source, so that
    a secret in the environment replaces a client_secret_file in the TOML file."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    def _set_current_state(self, state: dict[str, Any]) -> None:
        super()._set_current_state(state)
        self._inner._set_current_state(state)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = self._inner()
        if any(self.current_state.get(key) is not None for key in _SECRET_KEYS):
            data = {key: value for key, value in data.items() if key not in _SECRET_KEYS}
        return data


class Settings(BaseSettings):
    """The whole configuration, immutable once loaded."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
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
        f"{MAX_WORKERS}; tokens are still fetched once, rate limits split between them",
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
        description="upstream base URL of the route `/`",
        json_schema_extra={
            "shown_default": "`https://{region}.api.blizzard.com` "
            "(`cn`: `https://gateway.battlenet.com.cn`)"
        },
    )
    token_url: str | None = Field(
        default=None,
        description="token endpoint",
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
    max_body_size: int | None = Field(
        default=None,
        ge=0,
        description="largest request body in bytes, 413 beyond; unset: no limit, bodies of "
        "any size stream through",
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        lower = (env_settings, file_secret_settings, _TomlSource(settings_cls))
        return (init_settings, *(_YieldSecret(source) for source in lower))

    @field_validator("log_level", "log_format", "region", "auth_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

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

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        credentials = dict(data.get("credentials") or {})
        routes = list(data.get("routes") or [])
        if data.get("client_id") == "":
            raise ValueError(
                "client_id (TOKEN_PROXY_CLIENT_ID) is empty; set it to your OAuth client id"
            )
        if data.get("client_id") is not None:
            if "default" in credentials:
                raise ValueError(
                    "client_id (TOKEN_PROXY_CLIENT_ID) defines the credential 'default', "
                    "and the config file has a [credentials.default] table too; keep one"
                )
            region = str(data.get("region") or "us").lower()
            shorthand = {
                key: data[key] for key in _SHORTHAND_CREDENTIAL_KEYS if data.get(key) is not None
            }
            for key in ("token_url", "upstream"):
                if data.get(key) is not None:
                    _check_shorthand_url(key, data[key])
            credentials["default"] = {"client_id": data["client_id"], **shorthand}
            if region in REGION_UPSTREAMS:
                credentials["default"]["region"] = region
            if not routes:
                upstream = data.get("upstream") or REGION_UPSTREAMS.get(region, "https://invalid")
                routes = [{"prefix": "/", "upstream": upstream, "credential": "default"}]
        else:
            stray = [
                key
                for key in (*_SHORTHAND_CREDENTIAL_KEYS, "upstream")
                if data.get(key) not in (None, "", cls.model_fields[key].default)
            ]
            if not credentials:
                raise ValueError(
                    "no credentials are configured; set TOKEN_PROXY_CLIENT_ID and "
                    "TOKEN_PROXY_CLIENT_SECRET (or TOKEN_PROXY_CLIENT_SECRET_FILE), "
                    "or add a [credentials.NAME] table to the config file"
                )
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply together with client_id (the single-API "
                    "shorthand); set client_id too, or move them into a [credentials.NAME] "
                    "table and a [[routes]] entry"
                )
        for name, table in credentials.items():
            regions = table.get("region_routes", ()) if isinstance(table, dict) else ()
            for region in regions if isinstance(regions, list | tuple) else ():
                if region in REGION_UPSTREAMS:
                    routes.append(
                        {
                            "prefix": f"/{region}/",
                            "upstream": REGION_UPSTREAMS[region],
                            "credential": name,
                        }
                    )
        if not routes:
            raise ValueError(
                "no routes are configured; add a [[routes]] table with prefix, upstream "
                "and credential to the config file"
            )
        data["credentials"] = credentials
        data["routes"] = routes
        return data

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for index, route in enumerate(self.routes):
            if route.credential not in self.credentials:
                known = ", ".join(sorted(self.credentials))
                raise ValueError(
                    f"routes[{index}].credential = {route.credential!r} names no credential; "
                    f"defined credentials: {known}"
                )
        prefixes = [route.match_prefix for route in self.routes]
        duplicates = sorted({p or "/" for p in prefixes if prefixes.count(p) > 1})
        if duplicates:
            raise ValueError(f"routes: prefix {duplicates[0]!r} is used by more than one route")
        names = [client.name for client in self.clients]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"clients: the name {repeated[0]!r} is used more than once")
        digests = [client.digest for client in self.clients]
        if len(set(digests)) != len(digests):
            raise ValueError("clients: two clients share one key; give each its own")
        if self.workers > 1:
            self._check_split_limits()
        if self.exposed_anonymously and not self.allow_anonymous_remote:
            raise ValueError(
                f"host (TOKEN_PROXY_HOST) = {self.host!r} is not a loopback address and no "
                "[[clients]] are configured, so anyone who can reach it could use your "
                "credentials; listen on 127.0.0.1, add [[clients]] with team keys, or set "
                "allow_anonymous_remote = true (TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true) "
                "if that is really intended"
            )
        return self

    def _check_split_limits(self) -> None:
        tables = [
            (f"credentials.{name}.rate_limit", credential.rate_limits)
            for name, credential in self.credentials.items()
        ]
        tables += [(f"clients[{i}].rate_limit", c.rate_limit) for i, c in enumerate(self.clients)]
        for where, values in tables:
            for value in values:
                if limits.parse(value).amount < self.workers:
                    raise ValueError(
                        f"{where} {value!r} cannot be split between {self.workers} workers "
                        "(workers, TOKEN_PROXY_WORKERS): each would get less than one "
                        "request; lower workers, or count the limit over a longer window "
                        '(e.g. "60/minute" rather than "1/second")'
                    )

    def split_limits(self) -> tuple[dict[str, Credential], tuple[Client, ...]]:
        """The credentials and clients with every rate limit divided between the workers
        (rounded down, so that together they never exceed it): one worker's share."""
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
    def routes_by_length(self) -> tuple[Route, ...]:
        """Routes with the longest prefix first, the order in which they are matched."""
        return tuple(sorted(self.routes, key=lambda r: len(r.match_prefix), reverse=True))


def _check_shorthand_url(key: str, value: Any) -> None:
    try:
        check_url(str(value), what=key, allow_path=key != "upstream")
    except ValueError as exc:
        raise ValueError(f"{key} ({ENV_PREFIX}{key.upper()}): {exc}") from None


def _setting_name(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(item)
    name = ".".join(parts)
    if len(loc) == 1 and isinstance(loc[0], str) and loc[0] in Settings.model_fields:
        name = f"{name} ({ENV_PREFIX}{loc[0].upper()})"
    return name


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error.get("loc", ()))
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    kind = error.get("type")
    # Credential and route tables report their own nested location in the message.
    loc = tuple(item for item in loc if not str(item).startswith(("function-", "tagged-union")))
    if kind == "extra_forbidden":
        field = str(loc[-1]) if loc else "?"
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(field, known, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "remove it or check the spelling"
        return f"{_setting_name(loc)}: unknown setting; {fix}"
    if kind == "missing":
        return f"{_setting_name(loc)}: is required but not set"
    if not loc:
        return message
    return f"{_setting_name(loc)}: {message}"


def _known_keys(parent: tuple[int | str, ...]) -> list[str]:
    if not parent:
        return list(Settings.model_fields)
    if parent[0] == "credentials":
        return list(Credential.model_fields)
    if parent[0] == "routes":
        return list(Route.model_fields)
    if parent[0] == "clients":
        return list(Client.model_fields)
    return []


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(
            f"config (--config / TOKEN_PROXY_CONFIG): cannot read {str(path)!r} "
            f"({exc.strerror}); check the path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _check_environment(environ: Mapping[str, str]) -> None:
    known = {name.upper() for name in Settings.model_fields} | _LOADER_ENV
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        suffix = upper.removeprefix(ENV_PREFIX)
        if suffix not in known:
            hint = difflib.get_close_matches(suffix, sorted(known), n=1)
            fix = f"did you mean {ENV_PREFIX}{hint[0]}?" if hint else "unset it"
            raise ConfigError(f"environment variable {name} is not a setting; {fix}")


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build Settings from every source, or raise ConfigError with one line per problem."""
    environ = os.environ
    _check_environment(environ)
    if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
    toml = _read_toml(config_file) if config_file is not None else {}
    secrets_dir_value = environ.get(f"{ENV_PREFIX}SECRETS_DIR")
    secrets_dir: Path | None = None
    if secrets_dir_value:
        secrets_dir = Path(secrets_dir_value)
        if not secrets_dir.is_dir():
            raise ConfigError(
                f"TOKEN_PROXY_SECRETS_DIR = {secrets_dir_value!r} is not a directory; "
                "point it at the folder holding the secret files, or unset it"
            )
    elif DEFAULT_SECRETS_DIR.is_dir():
        secrets_dir = DEFAULT_SECRETS_DIR
    init = {key: value for key, value in (flags or {}).items() if value is not None}
    reset = _toml_data.set(toml)
    try:
        return Settings(_secrets_dir=secrets_dir, **init)  # type: ignore[call-arg]  # pydantic-settings init option
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(problems))) from None
    finally:
        _toml_data.reset(reset)
