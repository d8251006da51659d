"""``approx_prefix``: SGLang-router style cache-aware routing on the router's approximate prefix index.

If the load is imbalanced (``max - min > balance_abs_threshold`` and ``max > min *
balance_rel_threshold``, load = outstanding requests) the least-loaded replica is chosen. Otherwise the
replica with the longest cached prefix is chosen if its match rate exceeds ``cache_threshold``; below it,
the replica with the smallest index (the most free cache). Defaults are sgl-model-gateway's
(0.3, 64, 1.5). The index itself is the ``FleetState`` prefix index (approximate mode: what was sent).
"""

from __future__ import annotations

from pydantic import Field

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, PolicyParams, explain_costs, request_load


class ApproxPrefixParams(PolicyParams):
    cache_threshold: float = Field(0.3, ge=0.0, le=1.0)
    balance_abs_threshold: int = Field(64, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)


class ApproxPrefix(BasePolicy):
    name = "approx_prefix"
    Params = ApproxPrefixParams
    category = "BALANCE"
    params: ApproxPrefixParams

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        p = self.params
        cands = self.candidates(req, fleet)
        loads = [request_load(r, now, p.sample_max_age_s) for r in cands]
        lo, hi = min(loads), max(loads)
        matches: list[int] | None = None
        if hi - lo > p.balance_abs_threshold and hi > lo * p.balance_rel_threshold:
            i = loads.index(lo)
            chosen, reason, cached = cands[i], f"imbalanced (max {hi}, min {lo}) -> least loaded", None
        else:
            hs = req.block_hashes
            matches = [r.index.match(hs) for r in cands]
            best = max(range(len(cands)), key=lambda k: (matches[k], -loads[k]))
            rate = matches[best] / len(hs) if hs else 0.0
            if rate > p.cache_threshold:
                chosen, cached = cands[best], matches[best]
                reason = f"prefix match {rate:.2f} > {p.cache_threshold} -> best match"
            else:
                k = min(range(len(cands)), key=lambda k: (len(cands[k].index), loads[k]))
                chosen, cached = cands[k], matches[k]
                reason = f"prefix match {rate:.2f} <= {p.cache_threshold} -> smallest cache"
        trace = None
        if explain:
            scores = {
                r.replica_id: {"load": loads[k], "tree_blocks": len(r.index)} for k, r in enumerate(cands)
            }
            trace = explain_costs(req, cands, now, scores)
        return self.decision(req, chosen, reason, cached_blocks=cached, candidates=trace)
