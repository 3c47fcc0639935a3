"""Loading: every source read and checked, Settings validated, each problem in one ConfigError."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from proxy.config import sources
from proxy.config.messages import ENV_PREFIX, Origins, Problem, problems_of
from proxy.config.model import SCHEMA, Settings
from proxy.config.secret_files import SecretFiles
from proxy.errors import ConfigError

# Environment variables read by the loader itself rather than by the model.
_LOADER_ENV = {"CONFIG", "SECRETS_DIR"}


@dataclass(frozen=True)
class Loaded:
    """Settings, and the secret files they were read from, to read again when they change."""

    settings: Settings
    secret_files: SecretFiles
    # The configuration file's table as read, for load(table=) to apply a change of the secret
    # files without reading the file again (it is read again on SIGHUP only).
    toml: Mapping[str, Any] | None = None


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build Settings from every source, or raise ConfigError with one line per problem."""
    return load(flags=flags, config_file=config_file).settings


def load(
    *,
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    table: Mapping[str, Any] | None = None,
) -> Loaded:
    """Settings from every source with the secret files they came from, or ConfigError with
    one line per problem. `table`: the file's table as read before (Loaded.toml), used
    instead of reading the file again."""
    environ = os.environ
    fields = frozenset(Settings.model_fields)
    problems = sources.check_environment(environ, known=fields | _LOADER_ENV)
    named_by = "--config"
    if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
        named_by = f"environment variable {ENV_PREFIX}CONFIG"
    # A file or directory that cannot be read leaves nothing sound to validate the rest on.
    fatal: list[Problem] = []
    cause: Exception | None = None
    raw: dict[str, Any] = {}
    if config_file is not None and table is not None:
        raw = dict(table)
    elif config_file is not None:
        try:
            raw = sources.read_toml(config_file, named_by=named_by)
        except ConfigError as exc:
            fatal.append(Problem((), exc.detail, where=""))
            cause = exc
    secrets_dir = sources.secrets_dir(environ)
    if isinstance(secrets_dir, Problem):
        fatal.append(secrets_dir)
        secrets_dir = None
    scan = (
        sources.scan_secrets_dir(secrets_dir, known=fields)
        if secrets_dir
        else sources.SecretsScan()
    )
    problems += scan.problems
    if scan.unusable == fields:
        secrets_dir = None
    toml: dict[str, Any] = {}
    if config_file is not None:
        toml, found = sources.check_toml(raw, path=config_file, schema=SCHEMA)
        problems += found
    init = {key: value for key, value in (flags or {}).items() if value is not None}
    origins = Origins.of(
        flags=init, environ=environ, secrets=scan.files, toml=toml, config_file=config_file
    )
    settings: Settings | None = None
    if not fatal:
        loading = sources.Loading(toml=toml, unusable_secrets=scan.unusable)
        reset = sources.loading.set(loading)
        try:
            settings = Settings(_secrets_dir=secrets_dir, **init)  # type: ignore[call-arg]  # pydantic-settings init option
        except (ValidationError, SettingsError) as exc:
            problems += problems_of(exc, schema=SCHEMA)
            cause = exc
        finally:
            sources.loading.reset(reset)
    report = origins.report([*fatal, *problems])
    if settings is None or report:
        raise ConfigError(report) from cause
    files = SecretFiles.of(settings, origins=origins, secrets_dir=secrets_dir, scan=scan)
    return Loaded(settings, files, raw if config_file is not None else None)
