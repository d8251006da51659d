"""``round_robin``: cycle through the healthy replicas of the model (LoRA- and cache-unaware)."""

from __future__ import annotations

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, explain_costs


class RoundRobin(BasePolicy):
    name = "round_robin"
    category = "DISTRIBUTION"

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self._next: dict[str, int] = {}

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        cands = self.candidates(req, fleet)
        i = self._next.get(req.model, self.params.seed) % len(cands)
        self._next[req.model] = i + 1
        chosen = cands[i]
        trace = explain_costs(req, cands, now, {}) if explain else None
        return self.decision(req, chosen, f"round robin: slot {i} of {len(cands)}", candidates=trace)
