"""Request targets as log lines show them: the values of query parameters that can carry a
credential (`access_token`, `client_secret`, `code`, `api_key`, ...) masked, all else as sent."""

from __future__ import annotations

import re
from urllib.parse import unquote

from proxy.log import REDACTED

# Names, case-insensitive, whose values can be credentials: OAuth's tokens, secrets and
# authorization codes, passwords, API keys (`key`, `api_key`, `x-api-key`, not `monkey`), and
# signed-URL signatures and session ids.
_SENSITIVE_PARAM = re.compile(
    r"token|secret|passw|pwd|credential|signature|session"
    r"|(^|[_.-])(api_?)?key($|[_.-])|^(auth_?)?code$|^auth(orization)?$|^sig$",
    re.IGNORECASE,
)
# Parameter names come from clients: remember verdicts, but never an unbounded number of them.
_MAX_REMEMBERED = 4096
_verdicts: dict[str, bool] = {}


def mask_query(target: str) -> str:
    """`target` (a path with its query, or a URL) with sensitive parameter values masked."""
    if "?" not in target:
        return target  # the usual case costs one scan and no allocation
    path, _, query = target.partition("?")
    params = query.split("&")
    masked = False
    for index, param in enumerate(params):
        name, _, value = param.partition("=")
        if value and _sensitive(name):
            params[index] = f"{name}={REDACTED}"
            masked = True
    return f"{path}?{'&'.join(params)}" if masked else target


def _sensitive(name: str) -> bool:
    verdict = _verdicts.get(name)
    if verdict is None:
        # Upstream decodes `access%5Ftoken` as access_token, so the check must too.
        plain = unquote(name.replace("+", " ")) if "%" in name or "+" in name else name
        verdict = _SENSITIVE_PARAM.search(plain) is not None
        if len(_verdicts) < _MAX_REMEMBERED:
            _verdicts[name] = verdict
    return verdict
