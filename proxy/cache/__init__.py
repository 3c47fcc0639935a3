"""The response cache of SPEC §10: RFC 9111 rules (policy), entries bounded in bytes
(storage) and as the replicas share them (shared), the step of the request path that answers
from it (step), and the trip upstream it plans (plan)."""

from proxy.cache.plan import BYPASS, HIT, MISS, REVALIDATED, Plan
from proxy.cache.step import ResponseCache

__all__ = ["BYPASS", "HIT", "MISS", "REVALIDATED", "Plan", "ResponseCache"]
