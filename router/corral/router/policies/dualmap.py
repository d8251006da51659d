"""``dualmap``: DualMap (Yuan et al., ICLR 2026) as published, without router-side rebalancing.

Implemented from the paper ([R] = the paper via write-ups, [C] = the authors' code):
1. Adaptive prefix key [R]: 512-token key units; descend while the prefix node is expanded; a node is
   expanded when its share of a sliding window exceeds 2/n and merged back below 1/n (window 200, 20
   samples minimum, from [C]; the paper's window size was not found). ``expand_share``/``merge_share``
   switch to the authors' fixed code thresholds (0.0612 / 0.02).
2. Dual mapping [R]: two independent consistent-hash rings, 160 virtual nodes each ([C]'s uhashring
   default), clockwise successor; on collision the second candidate is the next replica in stable order.
   Stand-in: the rings are seeded xxh3 (seeds 1 and 2) instead of uhashring MD5 / ketama.
3. SLO-aware selection [R]: TTFT(r, i) = tpct_i * (pending_prefill_tokens_i + uncached_tokens(r, i)); on
   equal hits pick the less-loaded candidate (paper wording); otherwise the warm candidate unless its TTFT
   exceeds ``switch_fraction * SLO`` (paper: 1.0, the tokens clearable within the SLO; code: 0.5), then
   the min-TTFT candidate of the pair. tpct defaults to the replica profile's per-token prefill time b1.
4-5. Router-held queues and hotspot migration are not part of the Policy interface (requests are
   dispatched at once), so this is "DualMap without rebalancing", like the Dynamo and SMG ports.
6. Join/leave only updates the rings (never ``hash mod n``).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ..state import FleetState, ReplicaState
from ..types import CandidateCost, Decision, RoutingRequest
from ._common import (
    BasePolicy,
    DualRing,
    HotPrefixKeyer,
    PolicyParams,
    RingCache,
    fallback_key,
    token_load,
    unit_blocks,
)


class DualMapParams(PolicyParams):
    ttft_slo_s: float = Field(5.0, gt=0.0)
    switch_fraction: float = Field(1.0, gt=0.0)
    key_block_tokens: int = Field(512, ge=1)
    window: int = Field(200, ge=1)
    min_samples: int = Field(20, ge=1)
    expand_factor: float = Field(2.0, gt=0.0)
    merge_factor: float = Field(1.0, ge=0.0)
    expand_share: float | None = None
    merge_share: float | None = None
    vnodes: int = Field(160, ge=1)
    tpct_s: float | None = Field(None, gt=0.0)


class DualMap(BasePolicy):
    name = "dualmap"
    Params: ClassVar[type[DualMapParams]] = DualMapParams
    category = "BALANCE"
    params: DualMapParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        p = self.params
        self.keyer = HotPrefixKeyer(
            p.window, p.min_samples, p.expand_factor, p.merge_factor, p.expand_share, p.merge_share
        )
        self._rings = RingCache(lambda ids: DualRing(ids, p.vnodes))
        self.last_pair: tuple[str, str] | None = None  # the candidate pair of the last ``choose``

    def _ttft(self, r: ReplicaState, uncached: int, now: float) -> tuple[float, int]:
        pending = token_load(r, now, self.params.sample_max_age_s)
        tpct = self.params.tpct_s if self.params.tpct_s is not None else r.profile.b1_us * 1e-6
        return tpct * (pending + uncached), pending

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        p = self.params
        cands = self.candidates(req, fleet)
        by_id = {r.replica_id: r for r in cands}
        rings: DualRing = self._rings.get(req.model, fleet)
        hs = req.block_hashes
        k = self.keyer.key(hs, unit_blocks(p.key_block_tokens, cands[0].block_size), len(cands))
        depth, key = k if k is not None else (0, fallback_key(req))
        id1, id2 = rings.pair(key, fleet.excluded)
        self.last_pair = (id1, id2)
        a, b = by_id[id1], by_id[id2]
        ha, hb = a.index.match(hs), b.index.match(hs)
        ua = max(0, req.prompt_tokens - ha * a.block_size)
        ub = max(0, req.prompt_tokens - hb * b.block_size)
        (ta, la), (tb, lb) = self._ttft(a, ua, now), self._ttft(b, ub, now)
        switch = p.switch_fraction * p.ttft_slo_s
        if ha * a.block_size == hb * b.block_size:
            chosen = a if la <= lb else b
            reason = f"equal hits ({ha} blocks) -> less loaded ({min(la, lb)} pending tokens)"
        else:
            warm, cold, tw, tc = (a, b, ta, tb) if ha > hb else (b, a, tb, ta)
            if tw <= switch:
                chosen, reason = warm, f"cache affinity: warm TTFT {tw:.3f}s <= {switch:.3f}s"
            else:
                chosen = warm if tw <= tc else cold
                reason = f"SLO switch: warm TTFT {tw:.3f}s > {switch:.3f}s -> min TTFT in pair"
        trace = None
        if explain:
            trace = []
            for r, h, t, load, tag in ((a, ha, ta, la, "c1"), (b, hb, tb, lb, "c2")):
                if tag == "c2" and b is a:
                    break
                trace.append(
                    CandidateCost(
                        r.replica_id,
                        r.gpu_class,
                        total_s=t,
                        queue_s=t * load / max(1, load + (ua if r is a else ub)),
                        prefill_s=t - t * load / max(1, load + (ua if r is a else ub)),
                        cached_blocks=h,
                        adapter_tier=r.adapter_tier(req.adapter),
                        extra={"ring": tag, "pending_tokens": load, "key_depth": depth},
                    )
                )
        return self.decision(req, chosen, reason, cached_blocks=ha if chosen is a else hb, candidates=trace)
