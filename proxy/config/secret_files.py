"""The secret files a Settings was read from, and reading them again to find which changed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import SecretStr

from proxy.config.messages import SECRET_PREFIX, Loc, Origins
from proxy.config.model import Settings
from proxy.config.sources import SecretsScan, read_secret_file, read_secrets_entry


@dataclass(frozen=True)
class SecretFile:
    """One file a setting's value was read from, and that value as read."""

    # The setting that names the file (credentials.NAME.client_secret_file), or for a file of
    # the secrets directory the setting it holds (client_secret).
    setting: Loc
    # As named, never resolved: a read follows the links as they are then, so that a swap of
    # Kubernetes' ..data link or a rename over the file is seen.
    path: Path
    # How messages name it: the file and key, the variable or the secrets file that set it.
    where: str
    value: SecretStr
    in_secrets_dir: bool = False

    def read(self) -> SecretStr:
        """The file's value now, or ValueError saying why it cannot be used (empty included)."""
        if not self.in_secrets_dir:
            what = "the Redis URL" if self.setting[-1] == "redis_url_file" else "the client secret"
            return SecretStr(read_secret_file(self.path, what=what))
        value = read_secrets_entry(self.path, inside=self.path.parent.resolve())
        if not value:
            raise ValueError("is empty; write the value in it")
        return SecretStr(value)


@dataclass(frozen=True)
class Reread:
    """What reading the secret files again found."""

    # The files with their values now; one that could not be read keeps the value read before.
    files: SecretFiles
    # The files whose value differs from the one read before (new files of the directory too).
    changed: tuple[SecretFile, ...] = ()
    # One line per file that became unreadable or empty: which file, why, and the fix.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretFiles:
    """The secret files a Settings was read from, which can be read again to find which
    changed. Reading blocks: call reread in a thread, away from the event loop."""

    files: tuple[SecretFile, ...] = ()
    secrets_dir: Path | None = None
    # The settings a file of the secrets directory may give (its name less token_proxy_).
    known: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls,
        settings: Settings,
        *,
        origins: Origins,
        secrets_dir: Path | None,
        scan: SecretsScan,
    ) -> SecretFiles:
        """The files `settings` came from: each credential's client_secret_file, and the files
        of the secrets directory that `scan` found, those a higher source overrides too (a
        change of theirs changes no setting, which a reload finds out)."""
        files: list[SecretFile] = []
        for name, credential in settings.credentials.items():
            if credential.client_secret_file is None:
                continue
            shorthand = name == "default" and settings.client_id is not None
            loc: Loc = (
                ("client_secret_file",)
                if shorthand
                else ("credentials", name, "client_secret_file")
            )
            where = origins.where(loc)
            files.append(
                SecretFile(loc, credential.client_secret_file, where, credential.client_secret)
            )
        if settings.redis_url_file is not None and settings.redis_url is not None:
            loc = ("redis_url_file",)
            files.append(
                SecretFile(loc, settings.redis_url_file, origins.where(loc), settings.redis_url)
            )
        for setting, path in scan.files.items():
            where = f"secrets file {path}"
            value = scan.values[setting]
            files.append(SecretFile((setting,), path, where, value, in_secrets_dir=True))
        return cls(tuple(files), secrets_dir, frozenset(type(settings).model_fields))

    def reread(self) -> Reread:
        """Read every file again, and the secrets directory for files new to it."""
        now: list[SecretFile] = []
        changed: list[SecretFile] = []
        problems: list[str] = []
        for file in (*self.files, *self._new_in_secrets_dir()):
            new = not file.value.get_secret_value()  # a file read before was never empty
            try:
                value = file.read()
            except ValueError as exc:
                kept = "it is left out" if new else "the value read before stays in use"
                problems.append(f"{file.where}: {exc}; {kept}")
                if not new:
                    now.append(file)
                continue
            if value.get_secret_value() == file.value.get_secret_value():
                now.append(file)
                continue
            fresh = replace(file, value=value)
            changed.append(fresh)
            now.append(fresh)
        return Reread(replace(self, files=tuple(now)), tuple(changed), tuple(problems))

    def _new_in_secrets_dir(self) -> list[SecretFile]:
        """Files of the secrets directory, with no value yet, that give a setting and were not
        there before."""
        if self.secrets_dir is None:
            return []
        held = {file.path.name for file in self.files if file.in_secrets_dir}
        try:
            entries = sorted(self.secrets_dir.iterdir())
        except OSError:
            return []  # each file it held says why it cannot be read
        return [
            SecretFile((name,), entry, f"secrets file {entry}", SecretStr(""), in_secrets_dir=True)
            for entry in entries
            if entry.name not in held
            and entry.name.lower().startswith(SECRET_PREFIX)
            and (name := entry.name.lower().removeprefix(SECRET_PREFIX)) in self.known
        ]
