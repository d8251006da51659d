"""``pow2``: power of two choices: sample two distinct replicas (seeded), take the less loaded."""

from __future__ import annotations

from typing import Literal

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, PolicyParams, explain_costs
from .least_loaded import load_fn


class Pow2Params(PolicyParams):
    by: Literal["requests", "tokens"] = "requests"


class PowerOfTwo(BasePolicy):
    name = "pow2"
    Params = Pow2Params
    category = "DISTRIBUTION"
    params: Pow2Params

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        cands = self.candidates(req, fleet)
        load = load_fn(self.params.by, now, self.params.sample_max_age_s)
        if len(cands) == 1:
            a = b = cands[0]
        else:
            i, j = self.rng.sample(range(len(cands)), 2)
            a, b = cands[i], cands[j]
        la, lb = load(a), load(b)
        chosen = a if la <= lb else b
        trace = None
        if explain:
            scores = {
                a.replica_id: {"load": la, "sampled": True},
                b.replica_id: {"load": lb, "sampled": True},
            }
            trace = explain_costs(req, [a, b] if a is not b else [a], now, scores)
        reason = f"power of two: {a.replica_id}={la} vs {b.replica_id}={lb} ({self.params.by})"
        return self.decision(req, chosen, reason, candidates=trace)
