"""``random``: a uniformly random healthy replica of the model (seeded; LoRA- and cache-unaware)."""

from __future__ import annotations

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, explain_costs


class RandomPick(BasePolicy):
    name = "random"
    category = "DISTRIBUTION"

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        cands = self.candidates(req, fleet)
        chosen = cands[self.rng.randrange(len(cands))]
        trace = explain_costs(req, cands, now, {}) if explain else None
        return self.decision(req, chosen, f"uniform random of {len(cands)}", candidates=trace)
