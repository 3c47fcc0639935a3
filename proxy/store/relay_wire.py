"""The messages between a worker and its supervisor on their socketpair, one JSON object a line:
a worker asks ("ask"; with an "id" when it awaits the "reply"), the supervisor tells ("tell":
a credential's token state, what another worker learnt of a path, the group's token metrics,
a reload to carry out and the group's reload metrics). Credentials are named by their
identity's digest. The messages carry tokens: never log one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.errors import StoreUnavailable
from proxy.metrics import TokenFigures
from proxy.refusals import Evidence, Refusal
from proxy.store.base import FetchFailure, SharedToken, TokenSnapshot

LINE_LIMIT = 2 * 1024 * 1024

Message = dict[str, Any]


def encode(message: Mapping[str, Any]) -> bytes:
    # default=str: a reload's table may hold a TOML date, which no setting takes.
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One message; ValueError, KeyError or TypeError when the line is not one."""
    message: object = json.loads(line)
    if not isinstance(message, dict) or not isinstance(
        message.get("ask", message.get("tell")), str
    ):
        raise TypeError("not a message")
    return message


# --- The values ----------------------------------------------------------------------------------


def token_value(token: SharedToken | None) -> Message | None:
    if token is None:
        return None
    return {
        "value": token.value,
        "obtained_at": token.obtained_at,
        "expires_at": token.expires_at,
        "scope": token.scope,
        "version": token.version,
    }


def read_token(raw: Mapping[str, Any] | None) -> SharedToken | None:
    if raw is None:
        return None
    scope = raw["scope"]
    return SharedToken(
        value=str(raw["value"]),
        obtained_at=float(raw["obtained_at"]),
        expires_at=float(raw["expires_at"]),
        scope=None if scope is None else str(scope),
        version=str(raw["version"]),
    )


def _failure(failure: FetchFailure | None) -> Message | None:
    if failure is None:
        return None
    return {
        "failures": failure.failures,
        "error": failure.error,
        "retry_at": failure.retry_at,
        "rejected": failure.rejected,
        "detail": failure.detail,
    }


def read_failure(raw: Mapping[str, Any] | None) -> FetchFailure | None:
    if raw is None:
        return None
    detail = raw["detail"]
    return FetchFailure(
        failures=int(raw["failures"]),
        error=str(raw["error"]),
        retry_at=float(raw["retry_at"]),
        rejected=bool(raw["rejected"]),
        detail=None if detail is None else str(detail),
    )


def _refusal(refusal: Refusal | None) -> Message | None:
    if refusal is None:
        return None
    return {"until": refusal.until, "evidence": refusal.evidence.value, "dropped": refusal.dropped}


def read_refusal(raw: Mapping[str, Any] | None) -> Refusal | None:
    if raw is None:
        return None
    return Refusal(
        until=float(raw["until"]),
        evidence=Evidence(raw["evidence"]),
        dropped=float(raw["dropped"]),
    )


# --- What a worker asks --------------------------------------------------------------------------


def ready() -> Message:
    """This worker has bound its port and serves."""
    return {"ask": "ready"}


def lock(credential: str, ttl: float) -> Message:
    return {"ask": "lock", "credential": credential, "ttl": ttl}


def unlock(credential: str, owner: str) -> Message:
    return {"ask": "unlock", "credential": credential, "owner": owner}


def publish(credential: str, token: SharedToken) -> Message:
    """`token` without its version: the store gives it one."""
    return {"ask": "publish", "credential": credential, "token": token_value(token)}


def drop(credential: str, version: str) -> Message:
    return {"ask": "drop", "credential": credential, "version": version}


def fail(credential: str, failure: FetchFailure) -> Message:
    return {"ask": "fail", "credential": credential, "failure": _failure(failure)}


def path(credential: str, path: str, refusal: Refusal | None) -> Message:
    """What a path's 401s showed (no reply; the supervisor passes it on to the others)."""
    return {"ask": "path", "credential": credential, "path": path, "refusal": _refusal(refusal)}


# --- What the supervisor tells -------------------------------------------------------------------


def state(credential: str, snapshot: TokenSnapshot) -> Message:
    return {
        "tell": "state",
        "credential": credential,
        "token": token_value(snapshot.token),
        "failure": _failure(snapshot.failure),
        "generation": snapshot.generation,
    }


def read_state(message: Mapping[str, Any]) -> TokenSnapshot:
    return TokenSnapshot(
        token=read_token(message["token"]),
        failure=read_failure(message["failure"]),
        generation=int(message["generation"]),
    )


def path_known(credential: str, path: str, refusal: Refusal | None) -> Message:
    return {"tell": "path", "credential": credential, "path": path, "refusal": _refusal(refusal)}


def figures(credential: str, figures: TokenFigures) -> Message:
    return {
        "tell": "figures",
        "credential": credential,
        "fetches": dict(figures.fetches),
        "expiry": figures.expiry,
        "failures": figures.failures,
    }


def read_figures(message: Mapping[str, Any]) -> TokenFigures:
    return TokenFigures(
        fetches={str(outcome): float(count) for outcome, count in message["fetches"].items()},
        expiry=float(message["expiry"]),
        failures=float(message["failures"]),
    )


def reload(trigger: str, table: Mapping[str, Any] | None) -> Message:
    """Reload with the group: SIGHUP with the configuration file's table as the supervisor
    read it (so that every worker switches to the same configuration), or the secret files."""
    return {"tell": "reload", "trigger": trigger, "table": table}


def read_reload(message: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    table = message["table"]
    if table is not None and not isinstance(table, dict):
        raise TypeError("a reload's table is not a table")
    return str(message["trigger"]), table


def reloads(figures: Mapping[str, float]) -> Message:
    """The group's reload metrics (ConfigReloads.figures), which the supervisor counts."""
    return {"tell": "reloads", "figures": dict(figures)}


def read_reloads(message: Mapping[str, Any]) -> dict[str, float]:
    return {str(name): float(value) for name, value in message["figures"].items()}


def reply(ask_id: int, value: Any) -> Message:
    return {"tell": "reply", "id": ask_id, "value": value}


def unavailable(ask_id: int, exc: StoreUnavailable) -> Message:
    """The supervisor's store did not answer this ask (or knows no such credential)."""
    return {"tell": "reply", "id": ask_id, "unavailable": exc.detail, "kind": exc.kind}


def read_reply(message: Mapping[str, Any]) -> Any:
    """The value a reply carries; StoreUnavailable when it says the store did not answer."""
    if "unavailable" in message:
        raise StoreUnavailable(str(message["unavailable"]), kind=str(message["kind"]))
    return message["value"]
