"""The tables of the configuration: a credential (an OAuth client), a route and a team client."""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.config.battlenet import (
    BATTLENET_RATE_LIMIT,
    BATTLENET_TOKEN_URL,
    REGION_TOKEN_URLS,
    RegionName,
    is_battlenet_token_url,
)
from proxy.config.messages import Problem, Problems, Schema, problems_of
from proxy.config.sources import read_secret_file
from proxy.config.values import check_rate_limits, check_url

AuthMethod = Literal["client_secret_basic", "client_secret_post"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


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
        return is_battlenet_token_url(self.token_url)

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
                data["client_secret"] = read_secret_file(Path(secret_file))
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
            found = [
                p for p in problems_of(exc, schema=_SCHEMA) if p.missing != {("client_secret",)}
            ]
            raise Problems([*problems, *found]) from exc
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
_SCHEMA = Schema(top=Credential)


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
                ) from exc
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
