"""Messages: pydantic's errors as problems, each told as one "source: key: problem; fix" line."""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

# How every source spells a setting: TOKEN_PROXY_PORT, the file token_proxy_port, --port.
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


def literal(value: Any) -> str:
    """A value quoted in a templated message, its braces kept as they are."""
    return repr(value).replace("{", "{{").replace("}", "}}")


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


# --- pydantic's errors -------------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """The keys a configuration may hold: the top-level model, tables of named entries
    ([credentials.NAME]) and arrays of tables ([[routes]])."""

    top: type[BaseModel]
    named: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    listed: Mapping[str, type[BaseModel]] = field(default_factory=dict)

    def keys(self, parent: Loc) -> list[str]:
        """The keys of the table at `parent`: the top level, or one entry of a table."""
        if not parent:
            return list(self.top.model_fields)
        model = {**self.named, **self.listed}.get(str(parent[0]))
        return [] if model is None else list(model.model_fields)


def problems_of(exc: ValidationError | SettingsError, *, schema: Schema) -> list[Problem]:
    """pydantic's (or pydantic-settings') errors as Problems, each at the setting it is about:
    the one place where an error of the library becomes ours."""
    if isinstance(exc, SettingsError):
        # pydantic-settings could not decode a value (JSON of a table in the environment).
        return [Problem((), f"{exc}; write it as JSON, or move it to the config file", where="")]
    problems: list[Problem] = []
    for error in exc.errors():
        # Wrapping validators add steps to the location that name no setting.
        loc = tuple(i for i in error["loc"] if not str(i).startswith(("function-", "tagged-union")))
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            problems.extend(problem.moved(loc) for problem in cause.problems)
        elif error["type"] == "extra_forbidden" and loc:
            hint = suggest(str(loc[-1]), schema.keys(loc[:-1]))
            fix = f"did you mean {hint}?" if hint else "remove it or check the spelling"
            covers = None if hint is None else (*loc[:-1], hint)
            problems.append(Problem(loc, f"unknown key; {fix}", covers=covers))
        elif error["type"] == "missing":
            problems.append(Problem(loc, "is required but not set", missing=frozenset({loc})))
        else:
            problems.append(Problem(loc, str(error["msg"]).removeprefix("Value error, ")))
    return problems


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

    def report(self, problems: Iterable[Problem]) -> str:
        """The ConfigError's message: one line per problem, those implied by another left out."""
        lines = (self.render(problem) for problem in drop_implied(problems))
        return "\n".join(dict.fromkeys(lines))


class _Names(dict[str, str]):
    def __init__(self, origins: Origins, near: Kind | None) -> None:
        super().__init__()
        self._origins = origins
        self._near = near

    def __missing__(self, key: str) -> str:
        return self._origins.name(key, near=self._near)
