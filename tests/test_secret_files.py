"""The secret files a Settings came from (client_secret_file settings and the secrets directory):
which they are, and reading them again after Kubernetes' ..data swap, an atomic rename, a file
that became empty or unreadable, or a file new to the secrets directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Loaded, SecretFiles, load
from proxy.errors import ConfigError

CLIENT_ID = "files-client-id"
OLD = "Old-S3cret-Value-5a7e"
NEW = "New-S3cret-Value-0c9d"


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty secrets directory that load reads (TOKEN_PROXY_SECRETS_DIR)."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(directory))
    return directory


def kubernetes_mount(directory: Path, files: dict[str, str], *, version: str) -> None:
    """Lay out `files` as a Kubernetes Secret volume does, or update it as the kubelet does:
    a new timestamped folder, a ..data link swapped to it by one rename, the old one removed.
    Each file is a link through ..data, made once."""
    folder = directory / f"..{version}"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    data = directory / "..data"
    previous = data.resolve() if data.is_symlink() else None
    (directory / "..data_tmp").symlink_to(folder.name)
    os.replace(directory / "..data_tmp", data)
    if previous is not None:
        for stale in previous.iterdir():
            stale.unlink()
        previous.rmdir()
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def write_atomically(path: Path, text: str) -> None:
    """Replace a file's content by a rename over it, as Vault Agent and editors do."""
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def shorthand_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(text, encoding="utf-8")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", str(secret_file))
    return secret_file


def secret_of(loaded: Loaded, credential: str = "default") -> str:
    return loaded.settings.credentials[credential].client_secret.get_secret_value()


def test_every_secret_file_is_named_with_its_setting_and_value(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader knows each file a secret came from: the shorthand's client_secret_file, a
    credential table's (named by the config file and key), and the secrets directory's."""
    secret_file = shorthand_from_file(tmp_path, monkeypatch, OLD + "\n")
    (tmp_path / "api-secret").write_text(NEW, encoding="utf-8")
    (secrets_dir / "token_proxy_scope").write_text("read\n", encoding="utf-8")
    config = tmp_path / "config.toml"
    config.write_text(
        '[credentials.api]\nclient_id = "api"\nclient_secret_file = "api-secret"\n'
        'token_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/api/"\nupstream = "https://api.example.com"\ncredential = "api"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://eu.api.blizzard.com"\n'
        'credential = "default"\n',
        encoding="utf-8",
    )
    loaded = load(config_file=config)
    found = {file.setting: file for file in loaded.secret_files.files}
    assert set(found) == {
        ("client_secret_file",),
        ("credentials", "api", "client_secret_file"),
        ("scope",),
    }
    shorthand = found[("client_secret_file",)]
    assert shorthand.path == secret_file
    assert shorthand.where == "environment variable TOKEN_PROXY_CLIENT_SECRET_FILE"
    assert shorthand.value.get_secret_value() == OLD
    table = found[("credentials", "api", "client_secret_file")]
    assert table.path == tmp_path / "api-secret"
    assert table.where == f"{config}: credentials.api.client_secret_file"
    assert table.value.get_secret_value() == NEW
    scope = found[("scope",)]
    assert scope.where == f"secrets file {secrets_dir / 'token_proxy_scope'}"
    assert scope.in_secrets_dir
    assert scope.value.get_secret_value() == "read"
    assert OLD not in repr(loaded.secret_files)
    assert NEW not in repr(loaded.secret_files)


def test_reading_again_without_a_change_finds_none(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files read again with the same content (a trailing newline aside) report no change."""
    secret_file = shorthand_from_file(tmp_path, monkeypatch, OLD)
    (secrets_dir / "token_proxy_port").write_text("9001", encoding="utf-8")
    loaded = load()
    secret_file.write_text(OLD + "\n", encoding="utf-8")
    reread = loaded.secret_files.reread()
    assert reread.changed == ()
    assert reread.problems == ()
    assert reread.files == loaded.secret_files


def test_kubernetes_data_link_swap_is_seen(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret volume updated by the kubelet (a rename of the ..data link to a new folder, the
    files themselves untouched links) is read again with its new content."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    kubernetes_mount(secrets_dir, {"token_proxy_client_secret": OLD}, version="2026_01_01")
    loaded = load()
    assert secret_of(loaded) == OLD
    link = secrets_dir / "token_proxy_client_secret"
    before = link.lstat().st_ino, link.stat().st_ino
    kubernetes_mount(secrets_dir, {"token_proxy_client_secret": NEW}, version="2026_01_02")
    assert link.lstat().st_ino == before[0], "the link itself is untouched: lstat sees no change"
    assert link.stat().st_ino != before[1], "a watch on the old file's inode sees no change"
    reread = loaded.secret_files.reread()
    assert [file.setting for file in reread.changed] == [("client_secret",)]
    assert reread.changed[0].value.get_secret_value() == NEW
    assert reread.problems == ()
    assert reread.files.reread().changed == (), "the new content is what a next read compares to"


def test_atomic_rename_over_a_secret_file_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client_secret_file replaced by a rename over it (a new inode) is read again."""
    secret_file = shorthand_from_file(tmp_path, monkeypatch, OLD + "\n")
    loaded = load()
    inode = secret_file.stat().st_ino
    write_atomically(secret_file, NEW + "\n")
    assert secret_file.stat().st_ino != inode
    reread = loaded.secret_files.reread()
    assert [file.setting for file in reread.changed] == [("client_secret_file",)]
    assert reread.changed[0].value.get_secret_value() == NEW
    assert reread.changed[0].path == secret_file


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (
            lambda path: path.write_text("\n", encoding="utf-8"),
            "is empty; write the client secret in it",
        ),
        (Path.unlink, "cannot be read (No such file or directory); check the path"),
    ],
    ids=["empty", "removed"],
)
def test_secret_file_that_became_unusable_keeps_its_value_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil: Callable[[Path], object], why: str
) -> None:
    """A secret file that became empty or unreadable is a problem naming the setting, the file
    and why; its old value stays, so its return with that value is no change."""
    secret_file = shorthand_from_file(tmp_path, monkeypatch, OLD)
    loaded = load()
    spoil(secret_file)
    reread = loaded.secret_files.reread()
    assert reread.changed == ()
    assert reread.problems == (
        f"environment variable TOKEN_PROXY_CLIENT_SECRET_FILE: {str(secret_file)!r} {why}; "
        "the value read before stays in use",
    )
    assert reread.files == loaded.secret_files
    secret_file.write_text(OLD, encoding="utf-8")
    assert reread.files.reread().changed == ()
    secret_file.write_text(NEW, encoding="utf-8")
    assert reread.files.reread().changed[0].value.get_secret_value() == NEW


def test_secrets_directory_file_that_became_unusable_keeps_its_value(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the secrets directory, an emptied file and a link left dangling are each a problem
    that names the file; the others are still read."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    kubernetes_mount(secrets_dir, {"token_proxy_client_secret": OLD}, version="1")
    (secrets_dir / "token_proxy_port").write_text("9001", encoding="utf-8")
    (secrets_dir / "token_proxy_scope").write_text("read", encoding="utf-8")
    loaded = load()
    (secrets_dir / "token_proxy_port").write_text("", encoding="utf-8")
    (secrets_dir / "token_proxy_scope").write_text("write", encoding="utf-8")
    (secrets_dir / "..1" / "token_proxy_client_secret").unlink()
    reread = loaded.secret_files.reread()
    assert [file.setting for file in reread.changed] == [("scope",)]
    link = secrets_dir / "token_proxy_client_secret"
    port = secrets_dir / "token_proxy_port"
    assert set(reread.problems) == {
        f"secrets file {link}: is a link to '..data/token_proxy_client_secret', which does not "
        "exist; fix or remove the link; the value read before stays in use",
        f"secrets file {port}: is empty; write the value in it; the value read before stays in use",
    }
    kept = {file.setting: file.value.get_secret_value() for file in reread.files.files}
    assert kept == {("client_secret",): OLD, ("port",): "9001", ("scope",): "write"}


def test_file_new_to_the_secrets_directory_is_a_change(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file for a setting added to the secrets directory counts as changed; one that names no
    setting is left to the next load to refuse."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", OLD)
    loaded = load()
    assert loaded.secret_files.files == ()
    (secrets_dir / "token_proxy_scope").write_text("read\n", encoding="utf-8")
    (secrets_dir / "token_proxy_nonsense").write_text("x", encoding="utf-8")
    reread = loaded.secret_files.reread()
    assert [(file.setting, file.value.get_secret_value()) for file in reread.changed] == [
        (("scope",), "read")
    ]
    assert reread.files.reread().changed == ()


def test_a_new_file_that_cannot_be_read_is_left_out(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file of the secrets directory that is empty is a problem, and no file of it is kept."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", OLD)
    loaded = load()
    (secrets_dir / "token_proxy_scope").write_text("", encoding="utf-8")
    reread = loaded.secret_files.reread()
    assert reread.changed == ()
    assert reread.problems == (
        f"secrets file {secrets_dir / 'token_proxy_scope'}: is empty; write the value in it; "
        "it is left out",
    )
    assert reread.files == loaded.secret_files


def test_load_refuses_what_load_settings_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """load raises the same ConfigError as load_settings, with no files to read again."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    with pytest.raises(ConfigError, match="client_secret"):
        load()


def test_nothing_to_read_again_is_no_change() -> None:
    """Settings read from no secret file have nothing to read again."""
    reread = SecretFiles().reread()
    assert (reread.changed, reread.problems) == ((), ())
