"""The response cache of SPEC §10: RFC 9111 rules (policy), entries bounded in bytes
(storage), and the step of the request path that answers from it or plans the trip upstream
(step)."""

from proxy.cache.step import BYPASS, HIT, MISS, REVALIDATED, Plan, ResponseCache

__all__ = ["BYPASS", "HIT", "MISS", "REVALIDATED", "Plan", "ResponseCache"]
