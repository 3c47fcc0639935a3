"""Which store a configuration asks for: Redis behind the fallback to memory when redis_url is
set, else this process's memory; and whether a reload can keep the one it has."""

from __future__ import annotations

from proxy.config import Settings
from proxy.store.base import Store
from proxy.store.memory import MemoryStore

# The settings a store is built from: a reload that changes none of them keeps the store.
STORE_SETTINGS = ("redis_url", "redis_timeout", "redis_key_prefix")


def build_store(settings: Settings) -> Store:
    """The store `settings` ask for, not started: Redis behind the fallback to memory when
    redis_url is set (an unreachable Redis is no error: the store starts alone), else memory."""
    if settings.redis_url is None:
        return MemoryStore()
    # Imported here: a proxy without Redis never loads redis-py.
    from proxy.store.fallback import FallbackStore  # noqa: PLC0415
    from proxy.store.redis import RedisStore  # noqa: PLC0415
    from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

    target = parse_redis_url(settings.redis_url)
    shared = RedisStore(target, timeout=settings.redis_timeout, prefix=settings.redis_key_prefix)
    return FallbackStore(shared)


def same_store(old: Settings, new: Settings) -> bool:
    """Whether `new` asks for the store `old` has (a reload may then hand it over)."""
    return all(getattr(old, name) == getattr(new, name) for name in STORE_SETTINGS)
