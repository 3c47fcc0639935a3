"""The cache's entries as the replicas share them through the store (Redis): an entry packed to
bytes and back, and how long the store keeps it."""

from __future__ import annotations

import json
from typing import Any

from proxy.cache.policy import Entry, Primary

# A stale entry with a validator is kept this long past its freshness for revalidation (a
# 304 spares the body); none is kept longer than MAX_TTL, whatever its max-age says.
STALE_KEEP = 600.0
MAX_TTL = 86400.0
_FORMAT = 1


def primary_name(primary: Primary) -> bytes:
    """The name under which the store keeps the variants of `primary` (its credential is the
    store's own): the method and the URL."""
    return f"{primary[1]} {primary[2]}".encode()


def variant_name(entry: Entry) -> bytes:
    return json.dumps(entry.key, separators=(",", ":")).encode()


def shared_ttl(entry: Entry, now: float) -> float:
    """Seconds the store keeps `entry`; 0: not worth sharing."""
    left = entry.freshness_lifetime - entry.age(now)
    if entry.no_cache:
        left = 0.0
    keep = max(left, 0.0) + (STALE_KEEP if entry.validated else 0.0)
    return min(keep, MAX_TTL)


def pack(entry: Entry, *, now: float) -> bytes:
    """The entry as bytes: its fields as JSON, a newline, its body. Its age is carried as
    the age it has now, so that a replica whose clock differs counts on from there."""
    meta = {
        "v": _FORMAT,
        "method": entry.primary[1],
        "url": entry.primary[2],
        "vary": entry.vary,
        "key": entry.key,
        "status": entry.status,
        "reason": entry.reason,
        "headers": entry.headers,
        "age": entry.age(now),
        "lifetime": entry.freshness_lifetime,
        "no_cache": entry.no_cache,
        "etag": entry.etag,
        "last_modified": entry.last_modified,
    }
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + entry.body


def unpack(primary: Primary, data: bytes, *, now: float) -> Entry | None:
    """The entry `pack` made, or None when it is not one of `primary` (or not readable)."""
    head, newline, body = data.partition(b"\n")
    if not newline:
        return None
    try:
        meta: dict[str, Any] = json.loads(head)
        if meta.get("v") != _FORMAT or (meta["method"], meta["url"]) != primary[1:]:
            return None
        return Entry(
            primary=primary,
            vary=tuple(meta["vary"]),
            key=tuple((name, value) for name, value in meta["key"]),
            status=int(meta["status"]),
            reason=meta["reason"],
            headers=tuple((name, value) for name, value in meta["headers"]),
            body=body,
            response_time=now,
            corrected_initial_age=float(meta["age"]),
            freshness_lifetime=float(meta["lifetime"]),
            no_cache=bool(meta["no_cache"]),
            etag=meta["etag"],
            last_modified=meta["last_modified"],
        )
    except (ValueError, KeyError, TypeError):
        return None
