"""``lora_affinity``: adapter-affinity baseline (GIE lora-affinity scorer + queue scorer).

lora score = 1.0 if the adapter is GPU-resident, ``cpu_score`` if CPU-resident, ``room_score`` if the
replica has a free GPU adapter slot, else 0 (1.0 for every replica on base-model requests); queue score
= (max - q)/(max - min) over outstanding requests. The weighted sum's maximum wins; ties are broken by the
seeded RNG. Cache-unaware. ``least_loaded`` is its LoRA-unaware counterpart.
"""

from __future__ import annotations

from pydantic import Field

from ..state import FleetState
from ..types import Decision, RoutingRequest
from ._common import BasePolicy, PolicyParams, explain_costs, request_load


class LoraAffinityParams(PolicyParams):
    lora_weight: float = Field(1.0, ge=0.0)
    queue_weight: float = Field(1.0, ge=0.0)
    cpu_score: float = Field(0.9, ge=0.0, le=1.0)
    room_score: float = Field(0.8, ge=0.0, le=1.0)


class LoraAffinity(BasePolicy):
    name = "lora_affinity"
    Params = LoraAffinityParams
    category = "AFFINITY"
    params: LoraAffinityParams

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        p = self.params
        cands = self.candidates(req, fleet)
        a = req.adapter
        qs = [request_load(r, now, p.sample_max_age_s) for r in cands]
        qmin, qmax = min(qs), max(qs)
        span = qmax - qmin
        scores = []
        for k, r in enumerate(cands):
            if a is None or a in r.adapters_gpu:
                s_lora = 1.0
            elif a in r.adapters_cpu:
                s_lora = p.cpu_score
            elif len(r.adapters_gpu) < r.max_gpu_adapters:
                s_lora = p.room_score
            else:
                s_lora = 0.0
            s_queue = 1.0 if span == 0 else (qmax - qs[k]) / span
            scores.append(p.lora_weight * s_lora + p.queue_weight * s_queue)
        top = max(scores)
        ties = [k for k, s in enumerate(scores) if s == top]
        k = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        trace = None
        if explain:
            sc = {r.replica_id: {"score": scores[j], "load": qs[j]} for j, r in enumerate(cands)}
            trace = explain_costs(req, cands, now, sc)
        tier = cands[k].adapter_tier(a)
        reason = f"max lora+queue score {top:.3f} (adapter {a or '-'} tier {tier}, load {qs[k]})"
        return self.decision(req, cands[k], reason, candidates=trace)
