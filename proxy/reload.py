"""Changing a running proxy: SIGHUP reads the configuration file and the secret files again,
and a poll sees a secret file change. Each reload is validated before anything switches, the
running configuration stays when it is refused, and one log line and the reload metrics tell
how it went and what changed (by name, never a value)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from proxy.config import Loaded, SecretFile, Settings, fingerprint, load
from proxy.errors import ConfigError
from proxy.log import get_logger, set_logging
from proxy.metrics import ConfigReloads
from proxy.store.build import STORE_SETTINGS
from proxy.token_sources import identity_of

log = get_logger("proxy.reload")

# What a running process cannot change: its listeners, its processes, its upstream client.
RESTART_ONLY = ("host", "port", "metrics_port", "workers", "upstream_client")
# With workers, the store's settings too: the supervisor's token store is the group's.
RESTART_ONLY_WITH_WORKERS = (*RESTART_ONLY, *STORE_SETTINGS)
# The secret files are read this often. A poll, not inotify: Kubernetes updates a mounted
# Secret by swapping the `..data` symlink of the volume, and external-secrets or Vault Agent
# rename a new file over the old, so a watch on the file's inode never fires, and a watch on
# the directory has to know each tool's way; reading a few small files through their names
# every few seconds sees every way (and works on any filesystem, with no extra dependency).
SECRET_POLL_INTERVAL = 2.0
SIGHUP = "SIGHUP"
ROTATION = "secret files"
_TABLES = ("credentials", "routes", "clients")

Apply = Callable[[Loaded, "Changes"], Awaitable[None]]


@dataclass(frozen=True)
class ConfigSource:
    """Where the configuration comes from, to read it again: the command line's flags (which
    never change, like the environment) and the file."""

    flags: Mapping[str, Any] = field(default_factory=dict)
    config_file: Path | None = None

    def load(
        self, *, pinned: Mapping[str, Any] | None = None, table: Mapping[str, Any] | None = None
    ) -> Loaded:
        """Every source read and validated (blocking: files); `pinned` outranks them all."""
        flags = {**self.flags, **(pinned or {})}
        return load(flags=flags, config_file=self.config_file, table=table)


def _diff(
    old: Mapping[str, BaseModel], new: Mapping[str, BaseModel]
) -> tuple[list[str], list[str], list[str]]:
    added = [name for name in new if name not in old]
    removed = [name for name in old if name not in new]
    changed = [name for name in new if name in old and new[name] != old[name]]
    return added, removed, changed


@dataclass(frozen=True)
class Changes:
    """What a reload changes, by name only: routes by prefix, clients and credentials by name,
    the other settings by key. Never a value: some are secrets."""

    fields: Mapping[str, Sequence[str]]
    needs_restart: tuple[str, ...] = ()
    trigger: str = SIGHUP

    @classmethod
    def between(
        cls,
        old: Settings,
        new: Settings,
        *,
        needs_restart: tuple[str, ...] = (),
        trigger: str = SIGHUP,
    ) -> Changes:
        found: dict[str, Sequence[str]] = {}
        tables: dict[str, tuple[Mapping[str, BaseModel], Mapping[str, BaseModel]]] = {
            "routes": ({r.prefix: r for r in old.routes}, {r.prefix: r for r in new.routes}),
            "clients": ({c.name: c for c in old.clients}, {c.name: c for c in new.clients}),
            "credentials": (old.credentials, new.credentials),
        }
        for table, (before, after) in tables.items():
            added, removed, changed = _diff(before, after)
            found.update(
                {f"{table}_added": added, f"{table}_removed": removed, f"{table}_changed": changed}
            )
        credentials = found["credentials_changed"]
        found["credentials_replaced"] = [
            name
            for name in credentials
            if identity_of(old.credentials[name]) != identity_of(new.credentials[name])
        ]
        found["credentials_rotated"] = [
            name
            for name in credentials
            if name not in found["credentials_replaced"]
            and old.credentials[name].client_secret != new.credentials[name].client_secret
        ]
        found["settings_changed"] = [
            key
            for key in type(new).model_fields
            if key not in _TABLES
            and key not in needs_restart
            and getattr(old, key) != getattr(new, key)
        ]
        return cls({key: names for key, names in found.items() if names}, needs_restart, trigger)

    @property
    def removed_credentials(self) -> Sequence[str]:
        return self.fields.get("credentials_removed", ())

    @property
    def any(self) -> bool:
        return bool(self.fields)


class Reloader:
    """Reloads one process's configuration: `hup` (the SIGHUP handler) and `ask` queue a
    reload, `run` (a task of the serving loop) carries them out one at a time and polls the
    secret files in between. `apply` switches to validated settings; it may raise, and then
    the running configuration stays. The log level and format change here, for all."""

    def __init__(
        self,
        source: ConfigSource,
        loaded: Loaded,
        *,
        apply: Apply,
        reloads: ConfigReloads | None,
        reported: Callable[[], None] | None = None,
        poll: float | None = SECRET_POLL_INTERVAL,
    ) -> None:
        self._source = source
        self._loaded = loaded
        self._apply = apply
        self._reloads = reloads
        self._reported = reported
        self._poll = poll
        self._queue: asyncio.Queue[tuple[str, Mapping[str, Any] | None]] = asyncio.Queue()
        # The secret files' problems already logged: each is told once, not at every poll.
        self._problems: frozenset[str] = frozenset()

    @property
    def loaded(self) -> Loaded:
        """The configuration in force, as read (before a worker takes its share)."""
        return self._loaded

    def hup(self) -> None:
        """Read the configuration file and the secret files again."""
        self._queue.put_nowait((SIGHUP, None))

    def ask(self, trigger: str, table: Mapping[str, Any] | None = None) -> None:
        """A reload for a worker, as its supervisor did it: SIGHUP with the file's table as
        the supervisor read it (so the group switches to one configuration), or the secret
        files."""
        self._queue.put_nowait((trigger, table))

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._poll):
                    trigger, table = await self._queue.get()
            except TimeoutError:
                trigger, table = ROTATION, None
            try:
                if trigger == SIGHUP:
                    await self.reload(table=table)
                else:
                    await self.check_secrets()
            except Exception:  # the reloader must outlive any bug; the proxy keeps serving
                log.exception("reloading failed unexpectedly; the running configuration stays")

    async def reload(self, *, table: Mapping[str, Any] | None = None) -> bool:
        """SIGHUP: every source read again (the file's `table` given instead, for a worker)."""
        try:
            loaded, fixed = await asyncio.to_thread(self._read, table)
        except ConfigError as exc:
            self._refused(SIGHUP, exc.detail.splitlines())
            return False
        return await self._switch(SIGHUP, loaded, needs_restart=fixed)

    async def check_secrets(self) -> bool | None:
        """Read the secret files again; switch when one changed (None: none did)."""
        files = self._loaded.secret_files
        if not files.files and files.secrets_dir is None:
            return None  # every secret came from the environment or the file itself
        reread = await asyncio.to_thread(files.reread)
        fresh = [line for line in reread.problems if line not in self._problems]
        self._problems = frozenset(reread.problems)
        for line in fresh:
            log.warning("a secret file cannot be used; its last value stays in use", problem=line)
        previous = self._loaded
        # Seen, whatever comes of it: a change is tried once, not at every poll.
        seen = replace(previous, secret_files=reread.files)
        if not reread.changed:
            self._loaded = seen
            if fresh:
                self._count(ok=False)
            return None
        if any(file.in_secrets_dir for file in reread.changed):
            # A file of the secrets directory may set any setting: validate them all again,
            # with the configuration file as it was read (it is read again on SIGHUP only).
            try:
                loaded, fixed = await asyncio.to_thread(self._read, previous.toml)
            except ConfigError as exc:
                self._loaded = seen
                self._refused(ROTATION, exc.detail.splitlines())
                return False
        else:
            running = previous.settings
            settings = _with_secrets(running, reread.changed)
            # A secret that only a restart can change (redis_url, with workers) keeps its value.
            fixed = _changed(running, settings, _restart_only(running))
            settings = settings.model_copy(update={key: getattr(running, key) for key in fixed})
            loaded = Loaded(settings, reread.files, previous.toml)
        return await self._switch(ROTATION, loaded, needs_restart=fixed, otherwise=seen)

    def _read(self, table: Mapping[str, Any] | None) -> tuple[Loaded, tuple[str, ...]]:
        """The configuration read again, with the running value of each setting only a
        restart can change (validated with them, so a split of the rate limits between the
        running workers is checked too)."""
        running = self._loaded.settings
        loaded = self._source.load(table=table)
        fixed = _changed(running, loaded.settings, _restart_only(running))
        if not fixed:
            return loaded, ()
        values = {key: getattr(running, key) for key in fixed}
        pinned = {key: value for key, value in values.items() if value is not None}
        loaded = self._source.load(pinned=pinned, table=loaded.toml)
        unset = {key: None for key, value in values.items() if value is None}
        if unset:  # a flag cannot unset a setting; nothing else depends on these
            loaded = replace(loaded, settings=loaded.settings.model_copy(update=unset))
        return loaded, fixed

    async def _switch(
        self,
        trigger: str,
        loaded: Loaded,
        *,
        needs_restart: tuple[str, ...],
        otherwise: Loaded | None = None,
    ) -> bool:
        """Apply `loaded`; if that fails, `otherwise` (or the running one) stays in force."""
        old = self._loaded
        changes = Changes.between(
            old.settings, loaded.settings, needs_restart=needs_restart, trigger=trigger
        )
        try:
            await self._apply(loaded, changes)
        except Exception:
            log.exception(
                "the reloaded configuration could not be applied; the running one stays (send "
                "SIGHUP to try again)",
                trigger=trigger,
            )
            self._loaded = otherwise or old
            self._count(ok=False)
            return False
        self._loaded = loaded
        self._count(ok=True)
        config = fingerprint(loaded.settings)
        told: dict[str, Any] = {"trigger": trigger, "config": config}
        if config != fingerprint(old.settings):
            told["previous"] = fingerprint(old.settings)
        told.update({key: list(names) for key, names in changes.fields.items()})
        if needs_restart:
            named = ", ".join(needs_restart)
            log.warning(
                f"configuration reloaded, but {named} only change(s) with a restart: the "
                "running value stays until then",
                needs_restart=list(needs_restart),
                **told,
            )
        elif changes.any:
            log.info("configuration reloaded", **told)
        else:
            log.info("configuration reloaded: nothing changed", **told)
        # After the line above, which the level it had lets through: the reload is told.
        set_logging(level=loaded.settings.log_level, fmt=loaded.settings.log_format)
        return True

    def _refused(self, trigger: str, problems: list[str]) -> None:
        log.error(
            "the configuration was not reloaded: the running one stays; fix these and reload "
            "again (token-proxy check validates the file)",
            trigger=trigger,
            problems=problems,
            config=fingerprint(self._loaded.settings),
        )
        self._count(ok=False)

    def _count(self, *, ok: bool) -> None:
        if self._reloads is not None:
            self._reloads.record(ok=ok)
        if self._reported is not None:
            self._reported()


def _with_secrets(settings: Settings, changed: Sequence[SecretFile]) -> Settings:
    """`settings` with each client_secret_file's and the redis_url_file's value as read
    again: no other setting depends on a secret, so nothing else needs validating (a Redis
    URL is checked as it was at start-up, by the store's parser)."""
    credentials = dict(settings.credentials)
    update: dict[str, Any] = {}
    for file in changed:
        if file.setting == ("redis_url_file",):
            if _usable_redis_url(file):
                update["redis_url"] = file.value
            continue
        # credentials.NAME.client_secret_file, or the shorthand's client_secret_file.
        name = str(file.setting[1]) if file.setting[0] == "credentials" else "default"
        if name in credentials:
            credentials[name] = credentials[name].model_copy(update={"client_secret": file.value})
    return settings.model_copy(update={"credentials": credentials, **update})


def _usable_redis_url(file: SecretFile) -> bool:
    """Whether the Redis URL a rotated file holds can be used; one that cannot is logged (never
    quoted) and the running one stays."""
    from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415  (loads redis-py)

    try:
        parse_redis_url(file.value)
    except ValueError as exc:
        log.warning(
            "a secret file cannot be used; its last value stays in use",
            problem=f"{file.where}: {exc}",
        )
        return False
    return True


def _restart_only(running: Settings) -> tuple[str, ...]:
    """The settings that only a restart of `running` can change."""
    return RESTART_ONLY_WITH_WORKERS if running.workers > 1 else RESTART_ONLY


def _changed(old: Settings, new: Settings, names: Sequence[str]) -> tuple[str, ...]:
    """Which of the settings `names` differ between `old` and `new`."""
    return tuple(name for name in names if getattr(new, name) != getattr(old, name))
