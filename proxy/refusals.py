"""The memory behind the 401 rule: which upstream paths of one credential a new token will not
help, so that their 401s drop no token for a while. A revoked token is dropped at once however
recently the last one was; only a path with evidence against it is spared, and the evidence is
a token fetched after a 401 there being rejected there too. Each token store keeps one of these
per credential (proxy.store), which requests read and write without a wait."""

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
    """What is known of one path until `until` (on the clock of the memory that holds it: a
    token store's wall clock)."""

    until: float
    evidence: Evidence
    # When the token dropped for a 401 there was obtained (REPLAYING, SPENT), on the clock the
    # callers stamp their tokens with.
    dropped: float = 0.0


class RefusingPaths:
    """Upstream paths (URLs without their query) and what their 401s showed, each kept for
    REMEMBER_FOR seconds, in a bounded LRU. `on_refused` hears of each newly refusing path;
    `on_change` of every change that this memory's own events made (what `learn` and `forget`
    take in from elsewhere, and what runs out, are not told again)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        limit: int = REMEMBERED_PATHS,
        remember_for: float = REMEMBER_FOR,
        on_refused: Callable[[str], None] | None = None,
        on_change: Callable[[str, Refusal | None], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("a RefusingPaths must hold at least one path")
        self._clock = clock
        self._limit = limit
        self._remember_for = remember_for
        self._on_refused = on_refused
        self._on_change = on_change
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

    def refuses(self, path: str) -> bool:
        """Whether `path` is known to refuse every token now."""
        known = self.get(path)
        return known is not None and known.evidence is Evidence.REFUSED

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
            if self._on_change is not None:
                self._on_change(path, None)

    def refuse(self, path: str, *, seconds: float) -> None:
        """Remember for `seconds` that `path` refuses every token (what another replica saw)."""
        self._refused(path, seconds=seconds)

    def learn(self, path: str, refusal: Refusal) -> None:
        """Take in what another process learnt of `path`: a refusal known here stays."""
        known = self.get(path)
        if known is None or known.evidence is not Evidence.REFUSED:
            self._put(path, refusal, tell=False)

    def forget(self, path: str) -> None:
        """Take in that another process knows nothing of `path` any more (its replay there
        succeeded): a refusal known here stays."""
        known = self.get(path)
        if known is not None and known.evidence is not Evidence.REFUSED:
            del self._paths[path]

    def items(self) -> list[tuple[str, Refusal]]:
        """Every path still remembered, oldest first (for a worker that starts late)."""
        now = self._clock()
        return [(path, known) for path, known in self._paths.items() if known.until > now]

    def _refused(self, path: str, *, seconds: float | None = None) -> None:
        known = self.get(path)
        if known is not None and known.evidence is Evidence.REFUSED:
            return  # a refusal already known keeps its end: memory never outlives evidence
        lasts = self._remember_for if seconds is None else seconds
        self._put(path, Refusal(self._clock() + lasts, Evidence.REFUSED))
        if self._on_refused is not None:
            self._on_refused(path)

    def _put(self, path: str, refusal: Refusal, *, tell: bool = True) -> None:
        paths = self._paths
        paths[path] = refusal
        paths.move_to_end(path)
        if tell and self._on_change is not None:
            self._on_change(path, refusal)
        # Oldest first is soonest forgotten too: what has run out goes before the limit bites.
        now = self._clock()
        while len(paths) > self._limit or next(iter(paths.values())).until <= now:
            paths.popitem(last=False)
            if not paths:
                break
