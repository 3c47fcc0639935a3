"""The cache's entries in this process: bounded in bytes, the least recently used evicted first.

Written here because hishel's storages (SQLite, Redis) keep entries on disk or in Redis with a
TTL and have no bound in bytes, while this one must answer a hit from memory with a dictionary
look-up and hold the cache to `cache_max_bytes` whatever number of URLs is asked for."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from multidict import CIMultiDictProxy

from proxy.cache.policy import Entry, Primary, Secondary


class MemoryEntries:
    """Stored answers by primary key (credential, method, URL), each with its variants (newest
    first), in one LRU order; `bytes` counts what each entry holds (Entry.size)."""

    __slots__ = ("_lru", "_on_evict", "_variants", "bytes", "max_bytes")

    def __init__(self, *, max_bytes: int, on_evict: Callable[[int], None] | None = None) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._on_evict = on_evict
        self._lru: OrderedDict[tuple[Primary, Secondary], Entry] = OrderedDict()
        self._variants: dict[Primary, list[Entry]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def find(self, primary: Primary, headers: CIMultiDictProxy[str]) -> Entry | None:
        """The newest variant of `primary` that a request with `headers` selects."""
        variants = self._variants.get(primary)
        if variants is None:
            return None
        for entry in variants:
            if not entry.key or entry.matches(headers):
                return entry
        return None

    def touch(self, entry: Entry) -> None:
        """Mark `entry` used now, the last to be evicted."""
        slot = (entry.primary, entry.key)
        if self._lru.get(slot) is entry:
            self._lru.move_to_end(slot)

    def put(self, entry: Entry) -> bool:
        """Store `entry` in place of the variant it replaces, evicting the least recently used
        until the bound holds; False when it alone exceeds the bound."""
        if entry.size > self.max_bytes:
            return False
        slot = (entry.primary, entry.key)
        old = self._lru.get(slot)
        if old is not None:
            self._forget(old)
        self._lru[slot] = entry
        self._variants.setdefault(entry.primary, []).insert(0, entry)
        self.bytes += entry.size
        evicted = 0
        while self.bytes > self.max_bytes:
            _, oldest = self._lru.popitem(last=False)
            self._unlist(oldest)
            evicted += 1
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return True

    def remove(self, entry: Entry) -> None:
        """Drop `entry` if it is still the one stored (another request may have replaced it)."""
        if self._lru.get((entry.primary, entry.key)) is entry:
            self._forget(entry)

    def drop(self, primary: Primary) -> int:
        """Drop every variant of `primary` (an unsafe method changed it, RFC 9111 §4.4)."""
        variants = self._variants.get(primary)
        if not variants:
            return 0
        dropped = list(variants)
        for entry in dropped:
            self._forget(entry)
        return len(dropped)

    def clear(self) -> None:
        self._lru.clear()
        self._variants.clear()
        self.bytes = 0

    def _forget(self, entry: Entry) -> None:
        del self._lru[(entry.primary, entry.key)]
        self._unlist(entry)

    def _unlist(self, entry: Entry) -> None:
        self.bytes -= entry.size
        variants = self._variants[entry.primary]
        variants.remove(entry)
        if not variants:
            del self._variants[entry.primary]
