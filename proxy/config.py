"""Settings: one pydantic-settings model read from flags, environment, secrets directory,
TOML file and defaults (highest first), and the checks that turn a bad configuration into a
message that names the setting and says how to fix it."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from proxy import sources
from proxy.errors import ConfigError
from proxy.sources import (
    Origins,
    Problem,
    Problems,
    SecretsScan,
    TomlSchema,
    check_environment,
    check_toml,
    drop_implied,
    read_toml,
    scan_secrets_dir,
    suggest,
    unreadable_fix,
)

ENV_PREFIX = sources.ENV_PREFIX
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
        description="token endpoint; may be left out for Battle.net (`region`, `region_routes`, "
        "or routes only to Battle.net APIs)",
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

    @model_validator(mode="wrap")
    @classmethod
    def _resolve(cls, data: Any, handler: ModelWrapValidatorHandler[Credential]) -> Credential:
        """Fill in the token URL and the secret (from its file), then report every problem
        of the table together: the secret's and those of each key."""
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        if data.get("token_url") is None:
            region = str(data.get("region") or "us").lower()
            data["token_url"] = REGION_TOKEN_URLS.get(region, BATTLENET_TOKEN_URL)
        problems: list[Problem] = []
        secret_file = data.get("client_secret_file")
        if secret_file is not None and data.get("client_secret") is not None:
            problems.append(
                Problem(("client_secret_file",), "is set and so is client_secret; keep only one")
            )
        elif isinstance(secret_file, str | Path):
            try:
                data["client_secret"] = _read_secret_file(Path(secret_file))
            except ValueError as exc:
                problems.append(Problem(("client_secret_file",), str(exc)))
        elif secret_file is None and data.get("client_secret") is None:
            problems.append(
                Problem(
                    ("client_secret",),
                    'is not set; add client_secret_file = "/path/to/file" (or client_secret) '
                    "to this table",
                    missing=_SECRET_MISSING,
                )
            )
        try:
            credential = handler(data)
        except ValidationError as exc:
            # The secret's absence is reported above, with how to give it.
            found = [p for p in problems_of(exc) if p.missing != {("client_secret",)}]
            raise Problems([*problems, *found]) from None
        if problems:
            raise Problems(problems)
        return credential

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


_SECRET_MISSING = frozenset({("client_secret",), ("client_secret_file",)})


def _read_secret_file(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{str(path)!r} {unreadable_fix(path, exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{str(path)!r} is empty; write the client secret in it")
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
                    f"{str(value)!r} is not a readable PEM file of CA certificates "
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
        if self.key is None and self.key_sha256 is None:
            raise Problems(
                [
                    Problem(
                        ("key_sha256",),
                        f"client {self.name!r} has no key: set exactly one of key or key_sha256",
                        missing=frozenset({("key",), ("key_sha256",)}),
                    )
                ]
            )
        if self.key is not None and self.key_sha256 is not None:
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


@dataclass(frozen=True)
class _Loading:
    """What load_settings has read and checked already, for the sources it gives pydantic."""

    toml: Mapping[str, Any]
    unusable_secrets: frozenset[str] = frozenset()


_loading: ContextVar[_Loading] = ContextVar("_loading", default=_Loading(toml={}))  # noqa: B039  (read-only default)


_expanding: ContextVar[bool] = ContextVar("_expanding", default=False)


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file's contents, already parsed by load_settings (so parse errors are ours)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_loading.get().toml)


class _SecretsDir(SecretsSettingsSource):
    """The secrets directory without the files load_settings found unusable and reported (a
    directory, a file it may not read), which pydantic-settings would warn about or crash on."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _loading.get().unusable_secrets:
            return None, field_name, False
        return super().get_field_value(field, field_name)


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
        if isinstance(file_secret_settings, SecretsSettingsSource):
            file_secret_settings = _SecretsDir(
                settings_cls, secrets_dir=file_secret_settings.secrets_dir
            )
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

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Expand the single-API shorthand, then report every problem at once: those of the
        configuration as a whole, found on the values as given, with those of each setting."""
        if not isinstance(data, dict) or _expanding.get():
            return handler(data)
        expanded = _expand(data)
        # model_validate goes through BaseSettings.__init__, which validates the expanded
        # data once more: that pass must not expand it again.
        reset = _expanding.set(True)
        try:
            settings = handler(expanded.data)
        except ValidationError as exc:
            found = [expanded.relocate(problem) for problem in problems_of(exc)]
            raise Problems([*expanded.problems, *found]) from None
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
        if self.workers > 1:
            problems += self._split_limit_problems()
        if problems:
            raise Problems(problems)
        return self

    def _split_limit_problems(self) -> list[Problem]:
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


# --- what is wrong with the configuration as a whole, found on the values as given ----------

# Settings of the shorthand's credential and route, moved back to the key that set them.
_FROM_SHORTHAND = frozenset({"client_id", "region", *_SHORTHAND_CREDENTIAL_KEYS})
BATTLENET_API_HOSTS = {urlsplit(url).hostname: region for region, url in REGION_UPSTREAMS.items()}
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def _literal(value: Any) -> str:
    """A value quoted in a templated message, its braces kept as they are."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def _field(table: Any, key: str) -> Any:
    """A key of a table as given, or None when the table is not one (pydantic says so)."""
    return table.get(key) if isinstance(table, dict) else None


def _battlenet_region(url: Any) -> str | None:
    """The region whose Battle.net API host the URL names, or None for any other host."""
    return BATTLENET_API_HOSTS.get(urlsplit(str(url)).hostname) if url else None


@dataclass(frozen=True)
class _Expanded:
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


def _expand(given: dict[str, Any]) -> _Expanded:
    """Add the shorthand's credential `default` and route `/`, and each credential's region
    routes; check what no single key can (names that refer to each other, the token URL)."""
    data = dict(given)
    credentials = data.get("credentials") or {}
    routes = data.get("routes") or []
    if not isinstance(credentials, dict) or not isinstance(routes, list | tuple):
        return _Expanded(data, [])  # pydantic says what they should be
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
        shorthand_keys = {k: data[k] for k in _SHORTHAND_CREDENTIAL_KEYS if data.get(k) is not None}
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
        problems += _stray_shorthand_keys(data)
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
    problems += _exposure_problems(data)
    data["credentials"] = credentials
    data["routes"] = routes
    return _Expanded(data, problems, shorthand, shorthand_route)


def _shorthand_provider(data: dict[str, Any], *, routes: bool, region: str) -> list[Problem]:
    """Without an explicit region, the shorthand takes Battle.net's token URL and API only as
    a pair: another provider's secret must never reach Battle.net's token endpoint."""
    upstream, token_url = data.get("upstream"), data.get("token_url")
    if upstream is not None and token_url is None:
        hint = _battlenet_region(upstream)
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
        if urlsplit(str(token_url)).hostname in BATTLENET_TOKEN_HOSTS:
            return []
        message = (
            "is set but {upstream} is not, so requests would go to Battle.net's API "
            f"({REGION_UPSTREAMS.get(region, '?')}) with this endpoint's tokens; set {{upstream}} "
            "to the API's base URL (or {region}, if this token endpoint serves Battle.net)"
        )
        missing = frozenset({("upstream",), ("region",)})
        return [Problem(("token_url",), message, missing=missing, template=True)]
    return []


def _stray_shorthand_keys(data: dict[str, Any]) -> list[Problem]:
    problems = []
    for key in (*_SHORTHAND_CREDENTIAL_KEYS, "upstream"):
        if data.get(key) in (None, "", Settings.model_fields[key].default):
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
        foreign = [i for i in used if _battlenet_region(routes[i].get("upstream")) is None]
        if foreign:
            # Only the host: a URL may carry a password (refused, but never shown).
            host = urlsplit(str(routes[foreign[0]].get("upstream"))).hostname
            why = f"but routes[{foreign[0]}] sends its token to {_literal(host)}"
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


def _exposure_problems(data: dict[str, Any]) -> list[Problem]:
    host = data.get("host", Settings.model_fields["host"].default)
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
            f"{_literal(host)} is not a loopback address and no [[clients]] are configured, so "
            "anyone who can reach it could use your credentials; listen on 127.0.0.1, add "
            "[[clients]] with team keys, or set {allow_anonymous_remote=true} if that is "
            "really intended",
            template=True,
        )
    ]


# --- pydantic's errors, and loading ------------------------------------------------------------


def problems_of(exc: ValidationError) -> list[Problem]:
    """pydantic's errors as Problems, each at the setting it is about."""
    problems: list[Problem] = []
    for error in exc.errors():
        # Wrapping validators add steps to the location that name no setting.
        loc = tuple(i for i in error["loc"] if not str(i).startswith(("function-", "tagged-union")))
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            problems.extend(problem.moved(loc) for problem in cause.problems)
        elif error["type"] == "extra_forbidden" and loc:
            hint = suggest(str(loc[-1]), _known_keys(loc[:-1]))
            fix = f"did you mean {hint}?" if hint else "remove it or check the spelling"
            covers = None if hint is None else (*loc[:-1], hint)
            problems.append(Problem(loc, f"unknown key; {fix}", covers=covers))
        elif error["type"] == "missing":
            problems.append(Problem(loc, "is required but not set", missing=frozenset({loc})))
        else:
            problems.append(Problem(loc, str(error["msg"]).removeprefix("Value error, ")))
    return problems


def _known_keys(parent: tuple[int | str, ...]) -> list[str]:
    tables: dict[str, type[BaseModel]] = {
        "credentials": Credential,
        "routes": Route,
        "clients": Client,
    }
    if not parent:
        return list(Settings.model_fields)
    model = tables.get(str(parent[0]))
    return [] if model is None else list(model.model_fields)


_SCHEMA = TomlSchema(
    top=Settings, named={"credentials": Credential}, listed={"routes": Route, "clients": Client}
)


def _secrets_dir(environ: Mapping[str, str]) -> Path | Problem | None:
    """The secrets directory to read, or the problem with the one named."""
    value = environ.get(f"{ENV_PREFIX}SECRETS_DIR")
    if not value:
        return DEFAULT_SECRETS_DIR if DEFAULT_SECRETS_DIR.is_dir() else None
    if not Path(value).is_dir():
        return Problem(
            (),
            f"{value!r} is not a directory; point it at the folder holding the secret files, "
            "or unset it",
            where=f"environment variable {ENV_PREFIX}SECRETS_DIR",
        )
    return Path(value)


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build Settings from every source, or raise ConfigError with one line per problem."""
    environ = os.environ
    fields = frozenset(Settings.model_fields)
    problems = check_environment(environ, known=fields | _LOADER_ENV)
    named_by = "--config"
    if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
        named_by = f"environment variable {ENV_PREFIX}CONFIG"
    # A file or directory that cannot be read leaves nothing sound to validate the rest on.
    fatal: list[Problem] = []
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = read_toml(config_file, named_by=named_by)
        except ConfigError as exc:
            fatal.append(Problem((), exc.detail, where=""))
    secrets_dir = _secrets_dir(environ)
    if isinstance(secrets_dir, Problem):
        fatal.append(secrets_dir)
        secrets_dir = None
    scan = scan_secrets_dir(secrets_dir, known=fields) if secrets_dir else SecretsScan()
    problems += scan.problems
    if scan.unusable == fields:
        secrets_dir = None
    toml: dict[str, Any] = {}
    if config_file is not None:
        toml, found = check_toml(raw, path=config_file, schema=_SCHEMA)
        problems += found
    init = {key: value for key, value in (flags or {}).items() if value is not None}
    origins = Origins.of(
        flags=init, environ=environ, secrets=scan.files, toml=toml, config_file=config_file
    )
    settings: Settings | None = None
    if not fatal:
        reset = _loading.set(_Loading(toml=toml, unusable_secrets=scan.unusable))
        try:
            settings = Settings(_secrets_dir=secrets_dir, **init)  # type: ignore[call-arg]  # pydantic-settings init option
        except ValidationError as exc:
            problems += problems_of(exc)
        except SettingsError as exc:
            problems.append(
                Problem((), f"{exc}; write it as JSON, or move it to the config file", where="")
            )
        finally:
            _loading.reset(reset)
    lines = [origins.render(problem) for problem in drop_implied([*fatal, *problems])]
    if settings is None or lines:
        raise ConfigError("\n".join(dict.fromkeys(lines)))
    return settings
