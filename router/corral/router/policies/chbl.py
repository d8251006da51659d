"""``chbl``: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

The prefix key (the chained hash of the first ``key_tokens`` tokens' blocks) is placed on a ring with
``vnodes`` virtual nodes per replica; walking clockwise, the first replica whose outstanding requests are
below ``ceil(c * (total + 1) / n)`` takes the request. Joins/leaves move only the arcs of one replica.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, HashRing, PolicyParams, RingCache, explain_costs, fixed_prefix_key
from .least_loaded import load_fn


class ChblParams(PolicyParams):
    c: float = Field(1.25, gt=1.0)
    vnodes: int = Field(160, ge=1)
    key_tokens: int = Field(1024, ge=1)
    by: Literal["requests", "tokens"] = "requests"


class ConsistentHashBoundedLoads(BasePolicy):
    name = "chbl"
    Params = ChblParams
    category = "AFFINITY"
    params: ChblParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self._rings = RingCache(lambda ids: HashRing(ids, self.params.vnodes, seed=self.params.seed))

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        cands = self.candidates(req, fleet)
        by_id = {r.replica_id: r for r in cands}
        ring: HashRing = self._rings.get(req.model, fleet)
        bs = cands[0].block_size
        key = fixed_prefix_key(req, math.ceil(self.params.key_tokens / bs))
        load = load_fn(self.params.by, now, self.params.sample_max_age_s)
        loads = {rid: load(r) for rid, r in by_id.items()}
        cap = math.ceil(self.params.c * (sum(loads.values()) + 1) / len(cands))
        home = None
        chosen = None
        hops = 0
        for rid in ring.walk(key):
            if rid not in by_id:  # hidden (a retry's exclusion)
                continue
            home = home or rid
            if loads[rid] + 1 <= cap:
                chosen = by_id[rid]
                break
            hops += 1
        if chosen is None:  # cannot happen (some load < mean), kept for safety
            chosen = min(cands, key=lambda r: loads[r.replica_id])
        trace = None
        if explain:
            scores = {rid: {"load": x, "cap": cap, "home": rid == home} for rid, x in loads.items()}
            trace = explain_costs(req, cands, now, scores)
        reason = (
            f"ring home {home}" if hops == 0 else f"ring home {home} over cap {cap}: {hops} hop(s) clockwise"
        )
        return self.decision(req, chosen, reason, candidates=trace)
