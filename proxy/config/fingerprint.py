"""A short name for a configuration, that /-/ready shows: never a secret, changed by any."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from proxy.config.model import Settings

FINGERPRINT_LENGTH = 12


def fingerprint(settings: Settings) -> str:
    """12 hex digits of the sha256 of the settings as JSON, each secret in it replaced by its
    own sha256: the value never enters, and rotating a secret gives another name."""
    text = json.dumps(_plain(settings.model_dump()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "sha256:" + hashlib.sha256(value.get_secret_value().encode()).hexdigest()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
