"""The sources (environment, secrets directory, TOML file, secret files) and their checks.

Environment, secrets directory and TOML file are checked for names that are no setting (with a
did-you-mean), and the TOML file's relative paths made relative to its folder, before
validation: so every message can name the variable, file and key where the fix goes. That is why
the TOML file does not go through pydantic-settings' own TomlConfigSettingsSource, which reads
the file itself: it would pass on the keys unchecked and the paths unresolved, skip a missing
file without a word, and raise tomllib's error as it is. It is an InitSettingsSource over the
parsed table, so the file's source here is one too, over the table as checked.
"""

from __future__ import annotations

import functools
import os
import tomllib
import typing
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
)

from proxy.config.messages import (
    ENV_PREFIX,
    SECRET_PREFIX,
    Loc,
    Problem,
    Schema,
    dotted,
    suggest,
    unreadable_fix,
)
from proxy.errors import ConfigError

DEFAULT_SECRETS_DIR = Path("/run/secrets")


# --- the environment ---------------------------------------------------------------------------


def check_environment(environ: Mapping[str, str], *, known: Collection[str]) -> list[Problem]:
    """A problem for each TOKEN_PROXY_* variable that names no setting, with a did-you-mean."""
    problems = []
    names = {name.upper() for name in known}
    for variable in environ:
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper.removeprefix(ENV_PREFIX) in names:
            continue
        hint = suggest(upper.removeprefix(ENV_PREFIX), names)
        fix = f"did you mean {ENV_PREFIX}{hint}?" if hint else "unset it"
        problems.append(
            Problem(
                (upper.removeprefix(ENV_PREFIX).lower(),),
                f"is not a setting; {fix}",
                where=f"environment variable {variable}",
                covers=None if hint is None else (hint.lower(),),
            )
        )
    return problems


# --- the secrets directory ---------------------------------------------------------------------


def secrets_dir(environ: Mapping[str, str]) -> Path | Problem | None:
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


@dataclass(frozen=True)
class SecretsScan:
    """What the secrets directory holds: the setting of each usable file and its value as read,
    the settings whose file pydantic-settings must not read (already reported), the problems."""

    files: Mapping[str, Path] = field(default_factory=dict)
    values: Mapping[str, SecretStr] = field(default_factory=dict)
    unusable: frozenset[str] = frozenset()
    problems: tuple[Problem, ...] = ()


def scan_secrets_dir(directory: Path, *, known: Collection[str]) -> SecretsScan:
    """Check every token_proxy_* entry of the secrets directory before pydantic-settings reads
    it: a name that is no setting, a directory, a link out of it, a file it may not read."""
    try:
        entries = sorted(directory.iterdir())
        inside = directory.resolve()
    except OSError as exc:
        problem = Problem(
            (), unreadable_fix(directory, exc), where=f"secrets directory {directory}"
        )
        return SecretsScan(unusable=frozenset(known), problems=(problem,))
    files: dict[str, Path] = {}
    values: dict[str, SecretStr] = {}
    unusable: set[str] = set()
    problems: list[Problem] = []
    for entry in entries:
        if not entry.name.lower().startswith(SECRET_PREFIX):
            continue
        name = entry.name.lower().removeprefix(SECRET_PREFIX)
        where = f"secrets file {entry}"
        if name not in known:
            hint = suggest(name, known)
            fix = f"did you mean {SECRET_PREFIX}{hint}?" if hint else "remove it or rename it"
            covers = None if hint is None else (hint,)
            problems.append(
                Problem((name,), f"names no setting; {fix}", where=where, covers=covers)
            )
            continue
        try:
            values[name] = SecretStr(read_secrets_entry(entry, inside=inside))
        except ValueError as exc:
            unusable.add(name)
            problems.append(Problem((name,), str(exc), where=where, covers=(name,)))
        else:
            files[name] = entry
    return SecretsScan(
        files=files, values=values, unusable=frozenset(unusable), problems=tuple(problems)
    )


def read_secrets_entry(entry: Path, *, inside: Path) -> str:
    """The value a file of the secrets directory holds, as pydantic-settings reads it, or
    ValueError saying what keeps it from being read: a dangling link, a link out of the
    directory, a directory, a file it may not read."""
    try:
        target = entry.resolve(strict=True)
    except FileNotFoundError as exc:
        if not entry.is_symlink():
            raise ValueError(unreadable_fix(entry, exc)) from exc
        link = os.readlink(entry)
        raise ValueError(
            f"is a link to {link!r}, which does not exist; fix or remove the link"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"cannot be followed ({exc}); fix or remove the link") from exc
    if target.is_dir():
        raise ValueError(unreadable_fix(target, IsADirectoryError()))
    if not target.is_file():
        raise ValueError("is not a regular file; put the secret in a file of that name")
    if inside not in target.parents:
        raise ValueError(
            f"is a link to {str(target)!r}, outside the secrets directory, which is not read; "
            "put the file itself in the directory"
        )
    try:
        return target.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(unreadable_fix(target, exc)) from exc
    except UnicodeDecodeError:
        # Not kept as the cause: the decode error holds the secret's bytes and quotes one.
        raise ValueError("is not UTF-8 text; write the value as text") from None


# --- the files named by *_file settings --------------------------------------------------------


def read_secret_file(path: Path, *, what: str = "the client secret") -> str:
    """The secret a client_secret_file (or redis_url_file) holds, its trailing newline
    stripped; `what` names the value an empty file lacks."""
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{str(path)!r} {unreadable_fix(path, exc)}") from exc
    except UnicodeDecodeError:
        # Not kept as the cause: the decode error holds the secret's bytes and quotes one.
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{str(path)!r} is empty; write {what} in it")
    return secret


# --- the TOML file -----------------------------------------------------------------------------


def read_toml(path: Path, *, named_by: str) -> dict[str, Any]:
    """The parsed file, or ConfigError naming the flag or variable that named it."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{named_by}: {str(path)!r} {unreadable_fix(path, exc)}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: is not valid TOML: {exc}") from exc


def check_toml(
    data: Mapping[str, Any], *, path: Path, schema: Schema
) -> tuple[dict[str, Any], list[Problem]]:
    """The file's settings without the keys that are no setting (each a problem with a
    did-you-mean) and with relative paths made relative to the file's directory."""
    base = path.absolute().parent.resolve()
    checked: dict[str, Any] = {}
    problems: list[Problem] = []
    fields = schema.top.model_fields
    check = functools.partial(_check_table, path=path, base=base, problems=problems)
    for key, value in data.items():
        if key in schema.named and isinstance(value, dict):
            model = schema.named[key]
            checked[key] = {
                name: check(table, model, loc=(key, name)) if isinstance(table, dict) else table
                for name, table in value.items()
            }
        elif key in schema.listed and isinstance(value, list):
            model = schema.listed[key]
            checked[key] = [
                check(table, model, loc=(key, index)) if isinstance(table, dict) else table
                for index, table in enumerate(value)
            ]
        elif key in fields:
            checked[key] = _relative_to(base, fields[key], value)
        else:
            problems.extend(_unknown_top_level(key, value, path, schema))
    return checked, problems


def _check_table(
    table: dict[str, Any],
    model: type[BaseModel],
    *,
    loc: Loc,
    path: Path,
    base: Path,
    problems: list[Problem],
) -> dict[str, Any]:
    fields = model.model_fields
    for key in table:
        if key not in fields:
            hint = suggest(key, fields)
            fix = f"did you mean {hint}?" if hint else "remove it or check the spelling"
            problems.append(
                Problem(
                    (*loc, key),
                    f"unknown key; {fix}",
                    where=f"{path}: {dotted((*loc, key))}",
                    covers=None if hint is None else (*loc, hint),
                )
            )
    return {
        key: _relative_to(base, fields[key], value) for key, value in table.items() if key in fields
    }


def _unknown_top_level(key: str, value: Any, path: Path, schema: Schema) -> list[Problem]:
    tables = [*schema.named, *schema.listed]
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        hint = suggest(key, tables) or suggest(key, schema.top.model_fields)
        return [
            _unknown_table(f"[{key}.{name}]", hint, f"[{hint}.{name}]", path, schema)
            for name in value
        ]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        hint = suggest(key, tables) or suggest(key, schema.top.model_fields)
        return [_unknown_table(f"[[{key}]]", hint, f"[[{hint}]]", path, schema)]
    if isinstance(value, dict):
        hint = suggest(key, tables) or suggest(key, schema.top.model_fields)
        return [_unknown_table(f"[{key}]", hint, f"[{hint}]", path, schema)]
    hint = suggest(key, schema.top.model_fields)
    fix = f"did you mean {hint}?" if hint else "remove it or check the spelling"
    covers = None if hint is None else (hint,)
    return [Problem((key,), f"unknown key; {fix}", where=f"{path}: {key}", covers=covers)]


def _unknown_table(
    written: str, hint: str | None, meant: str, path: Path, schema: Schema
) -> Problem:
    if hint is None:
        fix = "remove it or check the spelling"
    elif hint in schema.named:
        fix = f"did you mean [{hint}.NAME]?" if meant.startswith("[[") else f"did you mean {meant}?"
    elif hint in schema.listed:
        fix = f"did you mean [[{hint}]]?"
    else:
        fix = f"did you mean {hint}?"
    covers = None if hint is None else (hint,)
    return Problem((), f"unknown table; {fix}", where=f"{path}: {written}", covers=covers)


def _relative_to(base: Path, info: FieldInfo, value: Any) -> Any:
    """A relative path in a Path setting, read from the file, made relative to its folder."""
    if isinstance(value, str) and value and _is_path(info) and not Path(value).is_absolute():
        return str(base / value)
    return value


def _is_path(info: FieldInfo) -> bool:
    annotation = info.annotation
    return annotation is Path or Path in typing.get_args(annotation)


# --- the sources given to pydantic-settings ----------------------------------------------------


@dataclass(frozen=True)
class Loading:
    """What load_settings has read and checked already, for the sources it gives pydantic.
    Settings picks its sources in a classmethod, so this reaches it through the context of
    one load_settings call."""

    toml: Mapping[str, Any]
    unusable_secrets: frozenset[str] = frozenset()


loading: ContextVar[Loading] = ContextVar("loading", default=Loading(toml={}))  # noqa: B039  (read-only default)


# Each secret and the setting naming the file that holds it: one of a pair may be given.
_SECRET_PAIRS = (("client_secret", "client_secret_file"), ("redis_url", "redis_url_file"))


def _give_way(data: dict[str, Any], higher: Mapping[str, Any]) -> dict[str, Any]:
    """A source's values without a secret (value or file) that a higher source gives, so that
    a secret in the environment replaces a client_secret_file in the TOML file."""
    for pair in _SECRET_PAIRS:
        if any(higher.get(key) is not None for key in pair):
            data = {key: value for key, value in data.items() if key not in pair}
    return data


class _Environment(EnvSettingsSource):
    """The TOKEN_PROXY_* variables."""

    def __call__(self) -> dict[str, Any]:
        return _give_way(super().__call__(), self.current_state)


class _SecretsDir(SecretsSettingsSource):
    """The secrets directory without the files load_settings found unusable and reported (a
    directory, a file it may not read), which pydantic-settings would warn about or crash on."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in loading.get().unusable_secrets:
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return _give_way(super().__call__(), self.current_state)


class _TomlFile(InitSettingsSource):
    """The TOML file as load_settings read and checked it (see the module's docstring)."""

    def __call__(self) -> dict[str, Any]:
        return _give_way(super().__call__(), self.current_state)


def settings_sources(
    settings_cls: type[BaseSettings],
    *,
    init_settings: PydanticBaseSettingsSource,
    secrets_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Settings' sources, highest first: flags, environment, secrets directory, TOML file. The
    lower three are built here, each giving way to a higher one's secret in its own __call__;
    their options come from Settings.model_config, as pydantic-settings' own would."""
    secrets_dir = (
        secrets_settings.secrets_dir
        if isinstance(secrets_settings, SecretsSettingsSource)
        else None
    )
    return (
        init_settings,
        _Environment(settings_cls),
        _SecretsDir(settings_cls, secrets_dir=secrets_dir),
        _TomlFile(settings_cls, init_kwargs=dict(loading.get().toml)),
    )
