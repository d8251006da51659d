"""``least_loaded``: the replica with the fewest outstanding requests or pending prefill tokens.

LoRA-unaware and cache-unaware (the "Least Loaded" baseline of DualMap uses ``by="tokens"``).
Ties are broken by the seeded RNG.
"""

from __future__ import annotations

from typing import Literal

from ..state import FleetState, ReplicaState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, PolicyParams, explain_costs, request_load, token_load


class LeastLoadedParams(PolicyParams):
    by: Literal["requests", "tokens"] = "requests"


def load_fn(by: str, now: float, max_age: float):  # type: ignore[no-untyped-def]
    if by == "tokens":
        return lambda r: token_load(r, now, max_age)
    return lambda r: request_load(r, now, max_age)


class LeastLoaded(BasePolicy):
    name = "least_loaded"
    Params = LeastLoadedParams
    category = "DISTRIBUTION"
    params: LeastLoadedParams

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        cands = self.candidates(req, fleet)
        load = load_fn(self.params.by, now, self.params.sample_max_age_s)
        loads = [load(r) for r in cands]
        m = min(loads)
        ties: list[ReplicaState] = [r for r, x in zip(cands, loads, strict=True) if x == m]
        chosen = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        trace = None
        if explain:
            scores = {r.replica_id: {"load": x} for r, x in zip(cands, loads, strict=True)}
            trace = explain_costs(req, cands, now, scores)
        return self.decision(
            req, chosen, f"least loaded by {self.params.by}: {m} ({len(ties)} tied)", candidates=trace
        )
