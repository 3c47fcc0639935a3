"""README.md and config.example.toml stay true to the settings model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.config import Settings, load_settings
from scripts.config_reference import current, render

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    """Each setting of the model has a row in README's reference and a line in the example."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "config.example.toml").read_text()
    assert f"| `{name}` |" in readme
    assert name in example


def test_example_defaults_match_the_model() -> None:
    """Every value the example sets is the model's default."""
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    for key, value in example.items():
        assert Settings.model_fields[key].default == value, key


def test_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example file loads as it is, with the shorthand credential from the environment."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", "id")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", "secret-value")
    settings = load_settings(config_file=ROOT / "config.example.toml")
    assert settings.routes[0].upstream == "https://us.api.blizzard.com"


def test_team_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's complete team.toml loads once its placeholders are filled in."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("`team.toml`, complete:", 1)[1].split("```toml\n", 1)[1]
    text = block.split("```", 1)[0]
    text = text.replace("<64 hex digits printed by hash-key>", "ab" * 32)
    text = text.replace("<64 hex digits>", "cd" * 32)
    (tmp_path / "team.toml").write_text(text)
    (tmp_path / "bnet.secret").write_text("the-bnet-secret\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config_file=Path("team.toml"))
    assert sorted(route.prefix for route in settings.routes) == ["/eu/", "/kr/", "/tw/", "/us/"]
    assert [client.name for client in settings.clients] == ["dashboard", "nightly-export"]
    assert settings.credentials["bnet"].rate_limits == ("100/second", "36000/hour")


def test_reference_is_current() -> None:
    """README's configuration reference is what scripts/config_reference.py makes of the model."""
    readme = (ROOT / "README.md").read_text()
    assert current(readme) == render(), "README's reference is stale: run `make reference`"
