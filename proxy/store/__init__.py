"""Where shared state lives (tokens, rate-limit counters, 429 pauses): the interfaces, the
in-memory store, Redis behind a fallback to memory, and the workers' relay (relay.py)."""

from proxy.errors import StoreUnavailable
from proxy.store.base import (
    ALONE,
    SHARED,
    Admission,
    Claim,
    Counters,
    CredentialIdentity,
    FetchFailure,
    LimitStore,
    PauseStore,
    Rate,
    SharedToken,
    Slot,
    Store,
    TokenSnapshot,
    TokenStore,
)
from proxy.store.memory import MemoryStore

__all__ = [
    "ALONE",
    "SHARED",
    "Admission",
    "Claim",
    "Counters",
    "CredentialIdentity",
    "FetchFailure",
    "LimitStore",
    "MemoryStore",
    "PauseStore",
    "Rate",
    "SharedToken",
    "Slot",
    "Store",
    "StoreUnavailable",
    "TokenSnapshot",
    "TokenStore",
]
