"""Generate README.md's configuration reference from the settings model, so the two never
disagree. `make reference` rewrites it; the test suite fails when README's copy is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from proxy.config import ENV_PREFIX, Client, Credential, Route, Settings

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- reference:start: generated from proxy/config/ by `make reference` -->"
END = "<!-- reference:end -->"
_TOML_ONLY = {"credentials", "routes", "clients"}


def _shown_default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if value in ({}, (), []):
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _table(model: type[BaseModel], *, environment: bool) -> list[str]:
    if environment:
        lines = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    else:
        lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        cells = [f"`{name}`"]
        if environment:
            env = "(TOML only)" if name in _TOML_ONLY else f"`{ENV_PREFIX}{name.upper()}`"
            cells.append(env)
        cells += [_shown_default(field), field.description or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The reference block, markers included."""
    parts = [
        START,
        "",
        *_table(Settings, environment=True),
        "",
        "Keys of a `[credentials.NAME]` table:",
        "",
        *_table(Credential, environment=False),
        "",
        "Keys of a `[[routes]]` entry:",
        "",
        *_table(Route, environment=False),
        "",
        "Keys of a `[[clients]]` entry:",
        "",
        *_table(Client, environment=False),
        "",
        END,
    ]
    return "\n".join(parts)


def current(text: str) -> str:
    """README's copy of the block, markers included."""
    start = text.index(START)
    end = text.index(END, start) + len(END)
    return text[start:end]


def main(argv: list[str]) -> int:
    text = README.read_text()
    fresh = render()
    if "--check" in argv:
        if current(text) != fresh:
            print("README.md's configuration reference is stale: run `make reference`")
            return 1
        return 0
    README.write_text(text.replace(current(text), fresh))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
