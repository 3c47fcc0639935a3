"""The configuration's sources as the user wrote them (flags, environment, secrets directory,
TOML file): each checked for names that are no setting, and each problem named by the flag,
variable, file and key it came from, so that every message says where to make the fix."""

from __future__ import annotations

import difflib
import functools
import os
import tomllib
import typing
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from proxy.errors import ConfigError

ENV_PREFIX = "TOKEN_PROXY_"
SECRET_PREFIX = ENV_PREFIX.lower()
# The user the container image runs as (Dockerfile), named in the fix for unreadable files.
IMAGE_UID = 10001

Loc = tuple[str | int, ...]
Kind = Literal["flag", "env", "secrets", "file"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration: the setting it is about and what to do."""

    loc: Loc
    message: str
    # How to name the place when it is not the setting at `loc` (a file in the secrets directory).
    where: str | None = None
    # Settings whose absence this reports; a did-you-mean that points at one of them says more.
    missing: frozenset[Loc] = frozenset()
    # The setting a did-you-mean (or an unusable source) stands for.
    covers: Loc | None = None
    # The message names settings as {key}, each written as the user would set it.
    template: bool = False

    def moved(self, prefix: Loc) -> Problem:
        """The same problem for a table found at `prefix` of an outer one."""
        return replace(
            self,
            loc=(*prefix, *self.loc),
            missing=frozenset((*prefix, *loc) for loc in self.missing),
            covers=None if self.covers is None else (*prefix, *self.covers),
        )


class Problems(ValueError):
    """Every problem one validator found, raised through pydantic so that none hides another."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            "; ".join(
                f"{dotted(p.loc)}: {_plain(p)}" if p.loc else _plain(p) for p in self.problems
            )
        )


class _Keys(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return key.replace("=", " = ")


def _plain(problem: Problem) -> str:
    return problem.message.format_map(_Keys()) if problem.template else problem.message


def dotted(loc: Loc) -> str:
    """A setting's path as TOML's dotted keys write it, list items as [i]: routes[0].upstream."""
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else f".{item}" if text else item
    return text


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt one, if any is close."""
    hits = difflib.get_close_matches(name, sorted(known), n=1)
    return hits[0] if hits else None


def drop_implied(problems: Iterable[Problem]) -> list[Problem]:
    """The problems less those that only report a setting as missing when another problem
    already says where it went (a misspelt key, an unreadable secret file)."""
    items = list(problems)
    covered = {p.covers for p in items if p.covers is not None}
    return [p for p in items if not p.missing & covered]


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


def unreadable_fix(path: Path, exc: OSError) -> str:
    """Why a file cannot be read and how to fix it, for the usual causes in a container."""
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return (
            "is a directory, not a file; Docker makes one when the host file of a bind mount "
            "does not exist: remove the directory it made on the host, put the file there (or "
            "correct the mount's source path) and recreate the container"
        )
    if isinstance(exc, PermissionError):
        uid = os.geteuid()
        return (
            f"cannot be read ({exc.strerror}); make it readable for uid {uid}, the user "
            f"token-proxy runs as (the container image runs as uid {IMAGE_UID}), e.g. "
            f"`chown {uid} <file>` or `chmod 0444 <file>` on the host"
        )
    return f"cannot be read ({exc.strerror}); check the path"


@dataclass(frozen=True)
class SecretsScan:
    """What the secrets directory holds: the setting of each usable file, the settings whose
    file pydantic-settings must not read (already reported), and the problems."""

    files: Mapping[str, Path] = field(default_factory=dict)
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
        trouble = _secret_file_trouble(entry, inside)
        if trouble is None:
            files[name] = entry
        else:
            unusable.add(name)
            problems.append(Problem((name,), trouble, where=where, covers=(name,)))
    return SecretsScan(files=files, unusable=frozenset(unusable), problems=tuple(problems))


def _secret_file_trouble(entry: Path, inside: Path) -> str | None:
    """What keeps pydantic-settings from reading this secret file, or None."""
    try:
        target = entry.resolve(strict=True)
    except FileNotFoundError:
        return f"is a link to {os.readlink(entry)!r}, which does not exist; fix or remove the link"
    except (OSError, RuntimeError) as exc:
        return f"cannot be followed ({exc}); fix or remove the link"
    if target.is_dir():
        return unreadable_fix(target, IsADirectoryError())
    if not target.is_file():
        return "is not a regular file; put the secret in a file of that name"
    if inside not in target.parents:
        return (
            f"is a link to {str(target)!r}, outside the secrets directory, which is not read; "
            "put the file itself in the directory"
        )
    try:
        target.read_bytes().decode("utf-8")
    except OSError as exc:
        return unreadable_fix(target, exc)
    except UnicodeDecodeError:
        return "is not UTF-8 text; write the value as text"
    return None


# --- the TOML file -----------------------------------------------------------------------------


def read_toml(path: Path, *, named_by: str) -> dict[str, Any]:
    """The parsed file, or ConfigError naming the flag or variable that named it."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{named_by}: {str(path)!r} {unreadable_fix(path, exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: is not valid TOML: {exc}") from None


@dataclass(frozen=True)
class TomlSchema:
    """The keys a config file may hold: the top-level model, tables of named entries
    ([credentials.NAME]) and arrays of tables ([[routes]])."""

    top: type[BaseModel]
    named: Mapping[str, type[BaseModel]]
    listed: Mapping[str, type[BaseModel]]


def check_toml(
    data: Mapping[str, Any], *, path: Path, schema: TomlSchema
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


def _unknown_top_level(key: str, value: Any, path: Path, schema: TomlSchema) -> list[Problem]:
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
    written: str, hint: str | None, meant: str, path: Path, schema: TomlSchema
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


# --- naming the source of a setting ------------------------------------------------------------


@dataclass(frozen=True)
class Origins:
    """Which source set each top-level setting, in pydantic-settings' order (flags, environment,
    secrets directory, TOML file), to name it where a message points."""

    flags: Collection[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, Path] = field(default_factory=dict)
    toml: Mapping[str, Any] = field(default_factory=dict)
    config_file: Path | None = None

    @classmethod
    def of(
        cls,
        *,
        flags: Collection[str],
        environ: Mapping[str, str],
        secrets: Mapping[str, Path],
        toml: Mapping[str, Any],
        config_file: Path | None,
    ) -> Origins:
        env = {
            name.upper().removeprefix(ENV_PREFIX).lower(): name
            for name in environ
            if name.upper().startswith(ENV_PREFIX)
        }
        return cls(flags, env, secrets, toml, config_file)

    def origin(self, key: str) -> tuple[Kind, str] | None:
        """The source that set a top-level setting, and how it is named there."""
        if key in self.flags:
            return "flag", "--" + key.replace("_", "-")
        if key in self.env:
            return "env", self.env[key]
        if key in self.secrets:
            return "secrets", str(self.secrets[key])
        if key in self.toml:
            return "file", key
        return None

    def where(self, loc: Loc) -> str:
        """The flag, variable, file and key a problem at `loc` points to."""
        if not loc or not isinstance(loc[0], str):
            return dotted(loc)
        origin = self.origin(loc[0])
        if origin is None:
            return dotted(loc)
        kind, name = origin
        if kind == "file":
            return f"{self.config_file}: {dotted(loc)}"
        label = {
            "flag": name,
            "env": f"environment variable {name}",
            "secrets": f"secrets file {name}",
        }
        rest = f" ({dotted(loc)})" if len(loc) > 1 else ""
        return label[kind] + rest

    def name(self, key: str, *, near: Kind | None) -> str:
        """A setting named as its source spells it, or, when it is unset, as the source of the
        problem that mentions it would (a fix in the same place); `key=value` an assignment."""
        if "=" in key:
            return self._assignment(*key.split("=", 1), near=near)
        origin = self.origin(key)
        if origin is not None:
            kind, name = origin
            return Path(name).name if kind == "secrets" else name
        variable = ENV_PREFIX + key.upper()
        if near == "env":
            return variable
        if near == "file":
            return key
        return f"{key} ({variable})"

    def _assignment(self, key: str, value: str, *, near: Kind | None) -> str:
        """A setting given a value, written as in the source it would go to."""
        bare = value.strip('"')  # a shell needs no TOML quotes
        variable = f"{ENV_PREFIX}{key.upper()}={bare}"
        kind = (self.origin(key) or (near, ""))[0]
        if kind == "env":
            return variable
        if kind == "file":
            return f"{key} = {value}"
        return f"{key} = {value} ({variable})"

    def render(self, problem: Problem) -> str:
        """One line of the configuration error: where, then what is wrong and the fix."""
        where = problem.where if problem.where is not None else self.where(problem.loc)
        message = problem.message
        if problem.template:
            origin = self.origin(str(problem.loc[0])) if problem.loc else None
            message = message.format_map(_Names(self, None if origin is None else origin[0]))
        return f"{where}: {message}" if where else message


class _Names(dict[str, str]):
    def __init__(self, origins: Origins, near: Kind | None) -> None:
        super().__init__()
        self._origins = origins
        self._near = near

    def __missing__(self, key: str) -> str:
        return self._origins.name(key, near=self._near)
