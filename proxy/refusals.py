"""The memory behind the 401 rule: which upstream paths of one credential a new token will not
help, so that their 401s drop no token for a while. A revoked token is dropped at once however
recently the last one was; only a path with evidence against it is spared, and the evidence is
a token fetched after a 401 there being rejected there too."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

# How long a path keeps what was learnt of it.
REMEMBER_FOR = 10.0
# Paths come from clients: the memory holds at most this many per credential, least recently
# learnt first out.
REMEMBERED_PATHS = 4096


class Evidence(Enum):
    """What a path's 401s have shown so far."""

    # A token fetched after a 401 there was rejected there too: its 401s drop no token and
    # are not replayed.
    REFUSED = "refused"
    # A token was dropped for a 401 there and a replay with the next one is under way: a 401
    # there to any later token, before the replay succeeds, is evidence too.
    REPLAYING = "replaying"
    # A token was dropped for a 401 there to a request that could not be replayed: the next
    # such 401 there costs no token.
    SPENT = "spent"


class Refusal(NamedTuple):
    """What is known of one path until `until` (monotonic time, the same in every process)."""

    until: float
    evidence: Evidence
    # obtained_at of the token dropped for a 401 there (REPLAYING, SPENT).
    dropped: float = 0.0


class RefusingPaths:
    """Upstream paths (URLs without their query) and what their 401s showed, each kept for
    REMEMBER_FOR seconds, in a bounded LRU; `on_refused` hears of each newly refusing path."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        limit: int = REMEMBERED_PATHS,
        remember_for: float = REMEMBER_FOR,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("a RefusingPaths must hold at least one path")
        self._clock = clock
        self._limit = limit
        self._remember_for = remember_for
        self._on_refused = on_refused
        self._paths: OrderedDict[str, Refusal] = OrderedDict()

    def __len__(self) -> int:
        return len(self._paths)

    def get(self, path: str) -> Refusal | None:
        """What is known of `path` now; None once it is forgotten."""
        known = self._paths.get(path)
        if known is not None and known.until <= self._clock():
            del self._paths[path]
            return None
        return known

    def spares(self, path: str, *, obtained_at: float, replayable: bool) -> bool:
        """Whether a 401 at `path` to the token obtained at `obtained_at` must leave the token
        alone and go to the client unreplayed."""
        known = self.get(path)
        if known is None:
            return False
        if known.evidence is Evidence.REPLAYING:
            if obtained_at > known.dropped:
                self._refused(path)
                return True
            return False  # the dropped token itself: a replay will carry the new one
        return known.evidence is Evidence.REFUSED or not replayable

    def dropped(self, path: str, *, obtained_at: float, replayable: bool) -> None:
        """A 401 at `path` dropped the token obtained at `obtained_at`."""
        evidence = Evidence.REPLAYING if replayable else Evidence.SPENT
        self._put(path, Refusal(self._clock() + self._remember_for, evidence, obtained_at))

    def replayed(self, path: str, *, rejected: bool) -> None:
        """A replay at `path` with a newer token was answered: rejected too, or not."""
        if rejected:
            self._refused(path)
            return
        known = self.get(path)
        if known is not None and known.evidence is Evidence.REPLAYING:
            del self._paths[path]

    def learn(self, path: str, refusal: Refusal) -> None:
        """Take in what another process learnt of `path` (a worker, from its supervisor)."""
        known = self.get(path)
        if known is None or known.evidence is not Evidence.REFUSED:
            self._put(path, refusal)

    def items(self) -> list[tuple[str, Refusal]]:
        """Every path still remembered, oldest first (for a worker that starts late)."""
        now = self._clock()
        return [(path, known) for path, known in self._paths.items() if known.until > now]

    def _refused(self, path: str) -> None:
        known = self.get(path)
        if known is not None and known.evidence is Evidence.REFUSED:
            return  # a refusal already known keeps its end: memory never outlives evidence
        self._put(path, Refusal(self._clock() + self._remember_for, Evidence.REFUSED))
        if self._on_refused is not None:
            self._on_refused(path)

    def _put(self, path: str, refusal: Refusal) -> None:
        paths = self._paths
        paths[path] = refusal
        paths.move_to_end(path)
        # Oldest first is soonest forgotten too: what has run out goes before the limit bites.
        now = self._clock()
        while len(paths) > self._limit or next(iter(paths.values())).until <= now:
            paths.popitem(last=False)
            if not paths:
                break
