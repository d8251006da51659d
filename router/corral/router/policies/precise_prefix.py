"""``precise_prefix``: llm-d style weighted scorers over the precise (KV-event fed) prefix index.

score = w_prefix * matched_blocks/prompt_blocks + w_queue * (max_q - q)/(max_q - min_q)
        + w_kv * (1 - kv_usage); the maximum wins, ties broken by the seeded RNG (max-score picker).
Defaults 3/2/2 are llm-d's precise prefix-cache profile. Queue q = waiting requests (engine gauge when
fresh, else the router's count). Use ``FleetState(index_mode="precise")`` to feed it engine KV events.
"""

from __future__ import annotations

from pydantic import Field

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, PolicyParams, explain_costs, kv_usage, waiting_load


class PrecisePrefixParams(PolicyParams):
    prefix_weight: float = Field(3.0, ge=0.0)
    queue_weight: float = Field(2.0, ge=0.0)
    kv_weight: float = Field(2.0, ge=0.0)


class PrecisePrefix(BasePolicy):
    name = "precise_prefix"
    Params = PrecisePrefixParams
    category = "BALANCE"
    params: PrecisePrefixParams

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        p = self.params
        age = p.sample_max_age_s
        cands = self.candidates(req, fleet)
        hs = req.block_hashes
        nb = len(hs)
        matches = [r.index.match(hs) for r in cands]
        qs = [waiting_load(r, now, age) for r in cands]
        qmin, qmax = min(qs), max(qs)
        span = qmax - qmin
        scores = []
        for k, r in enumerate(cands):
            s_prefix = matches[k] / nb if nb else 0.0
            s_queue = 1.0 if span == 0 else (qmax - qs[k]) / span
            s_kv = 1.0 - kv_usage(r, now, age)
            scores.append(p.prefix_weight * s_prefix + p.queue_weight * s_queue + p.kv_weight * s_kv)
        top = max(scores)
        ties = [k for k, s in enumerate(scores) if s == top]
        k = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        trace = None
        if explain:
            sc = {r.replica_id: {"score": scores[j], "queue": qs[j]} for j, r in enumerate(cands)}
            trace = explain_costs(req, cands, now, sc)
        reason = f"max weighted score {top:.3f} (prefix {matches[k]}/{nb} blocks, queue {qs[k]})"
        return self.decision(req, cands[k], reason, cached_blocks=matches[k], candidates=trace)
