"""``corral``: the Corral cost model. One estimate in seconds per candidate, the minimum wins.

    estimated TTFT = queue_s    work already queued there: pending uncached prefill tokens x b1, in
                                chunks of ``chunk_tokens`` per step, each step also paying b0 + b2 x the
                                running decodes (router accounting, or the fresher LoadSample if larger)
                   + prefill_s  this request's uncached tokens (prompt minus cached leading blocks) on that
                                replica's GPU-class profile
                   + adapter_s  0 if the adapter is GPU-resident, else the profile's CPU->GPU or
                                disk->GPU load time for ``adapter_mb``, plus the expected wait for a LoRA
                                slot when all ``max_gpu_adapters`` slots hold adapters with requests in
                                flight (the soonest-draining adapter's remaining decode at the current step
                                time, see ``adapter_slot_wait_s``)

so an H100 and an L4 are compared in the same unit. Around the minimum:

(a) two-choice narrowing (DualMap-style). The *affinity set* is the two dual-ring candidates of the
    adaptive prefix key (hot prefixes get longer keys, see ``HotPrefixKeyer``; the Mooncake conversation
    trace shares block 0 in every request) plus, for adapter requests, the two ring candidates of the
    adapter id (its stable "home" pair, so an adapter stays resident on few replicas). Up to
    ``narrow_above`` replicas every candidate is evaluated too; above it, only when the affinity set's
    best exceeds ``switch_fraction`` x SLO are the least-loaded replica (by queue seconds) and the
    least-loaded replica holding the adapter on GPU added (O(1) prefix matches, each O(log blocks)).
    While the affinity best is under ``switch_fraction`` x SLO, another replica wins only if it is at
    least ``affinity_gain`` faster (a cached conversation elsewhere, an idle H100 vs a busy L4); otherwise
    a hot shared prefix would pull every cold request onto the one replica that holds it.
(b) near-ties: estimates within ``max(tie_tolerance_s, tie_tolerance_rel x best, tie_tolerance_slo x SLO)``
    of the best go to the candidate with more cached blocks (a little latency for less fleet compute:
    DualMap's cache-first rule inside the cost model), then to the ring candidates in ring order (the
    adapter pair first), so an idle or uniform fleet maps keys by the rings and a join/leave moves only
    ~1/N of the prefixes.
(c) SLO guard (``slo_guard``): the near-tie window and the hotspot guard may trade latency for reuse or
    balance only within the SLO. While the best estimate is within the SLO the tie window stops at the
    SLO, and the hotspot guard does not move a request that meets the SLO to one that misses it. When
    every estimate is over the SLO the cost model's pick stands: sending the request to the least-loaded
    replica instead (earlier versions) spread cache misses, which added prefill work and fed back.
(d) hotspot guard: the prefill seconds queued on the pick may exceed ``hotspot_floor_slo`` x SLO only up
    to ``hotspot_c`` x the fleet mean of pending prefill seconds (this request included); otherwise the
    best evaluated candidate under the cap is taken, else the least loaded. Seconds are each replica's own
    GPU time, so faster GPUs take proportionally more work (bounded loads, weighted by speed), and cheap
    decoding requests do not count: a conversation's next turn stays on the replica holding its cache.
"""

from __future__ import annotations

import math

import xxhash
from pydantic import Field

from ..state import FleetState, ReplicaState
from ..types import CandidateCost, Decision, RoutingRequest
from ._common import (
    BasePolicy,
    DualRing,
    HotPrefixKeyer,
    PolicyParams,
    RingCache,
    TtftEstimate,
    cost_of,
    estimate_ttft,
    fallback_key,
    queue_seconds,
    unit_blocks,
)

_xxh = xxhash.xxh3_64_intdigest


class CorralParams(PolicyParams):
    ttft_slo_s: float = Field(2.0, gt=0.0)
    slo_classes: dict[str, float] = Field(default_factory=dict)
    """TTFT SLO in seconds per ``RoutingRequest.slo_class``; other classes use ``ttft_slo_s``."""
    narrow_above: int = Field(16, ge=1)
    tie_tolerance_s: float = Field(0.002, ge=0.0)
    tie_tolerance_rel: float = Field(0.02, ge=0.0)
    tie_tolerance_slo: float = Field(0.2, ge=0.0)
    """Estimates within max(abs, rel x best, slo x SLO) of the best count as tied: the candidate with more
    cached blocks wins. With ``slo_guard`` the window stops at the SLO while the best is within it."""
    switch_fraction: float = Field(0.5, gt=0.0)
    affinity_gain: float = Field(0.3, ge=0.0, lt=1.0)
    """Below ``switch_fraction`` x SLO, leave the ring candidates only for an estimate this much lower."""
    slo_guard: bool = True
    """Near-ties and the hotspot guard may trade latency for reuse/balance only within the SLO."""
    hotspot_c: float | None = Field(3.0, gt=1.0)
    hotspot_floor_slo: float = Field(0.5, ge=0.0)
    """Queued prefill seconds on the pick may exceed ``hotspot_floor_slo`` x SLO only up to ``hotspot_c`` x
    the fleet mean pending prefill seconds (this request included); ``hotspot_c=None`` disables the guard."""
    chunk_tokens: int = Field(0, ge=0)
    """Prefill tokens per engine step; 0 = the replica profile's ``max_num_batched_tokens``."""
    adapter_mb: float = Field(85.0, gt=0.0)
    key_block_tokens: int = Field(512, ge=1)
    window: int = Field(200, ge=1)
    min_samples: int = Field(20, ge=1)
    expand_factor: float = Field(2.0, gt=0.0)
    merge_factor: float = Field(1.0, ge=0.0)
    vnodes: int = Field(160, ge=1)


class _Fleetwide:
    """Per-model data that only changes with membership: rings and throughput weights."""

    __slots__ = ("by_id", "rings", "weight", "weight_sum")

    def __init__(self, rings: DualRing, cands: list[ReplicaState]) -> None:
        self.rings = rings
        self.by_id = {r.replica_id: r for r in cands}
        self.weight = {r.replica_id: 1.0 / max(r.profile.b1_us, 1e-9) for r in cands}
        self.weight_sum = sum(self.weight.values())


class Corral(BasePolicy):
    name = "corral"
    Params = CorralParams
    category = "BALANCE"
    params: CorralParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        p = self.params
        self.keyer = HotPrefixKeyer(p.window, p.min_samples, p.expand_factor, p.merge_factor)
        self._fw: dict[str, tuple[FleetState, int, _Fleetwide]] = {}
        self._rings = RingCache(lambda ids: DualRing(ids, p.vnodes))

    def _fleetwide(self, model: str, fleet: FleetState) -> _Fleetwide:
        fleet = fleet.base  # a view hiding replicas shares the fleet's rings (lookups skip them)
        hit = self._fw.get(model)
        if hit is not None and hit[0] is fleet and hit[1] == fleet.version:
            return hit[2]
        fw = _Fleetwide(self._rings.get(model, fleet), fleet.members(model))
        self._fw[model] = (fleet, fleet.version, fw)
        return fw

    def slo_for(self, req: RoutingRequest) -> float:
        if req.slo_class is not None:
            return self.params.slo_classes.get(req.slo_class, self.params.ttft_slo_s)
        return self.params.ttft_slo_s

    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        p = self.params
        age, chunk = p.sample_max_age_s, p.chunk_tokens
        adapter_mb = req.adapter_size_mb if req.adapter_size_mb is not None else p.adapter_mb
        cands = self.candidates(req, fleet)
        n = len(cands)
        fw = self._fleetwide(req.model, fleet)
        skip = fleet.excluded
        k = self.keyer.key(req.block_hashes, unit_blocks(p.key_block_tokens, cands[0].block_size), n)
        key = k[1] if k is not None else fallback_key(req)
        c1, c2 = fw.rings.pair(key, skip)
        rank: dict[str, int] = {}
        roles: dict[str, str] = {}
        if req.adapter is not None:
            a1, a2 = fw.rings.pair(_xxh(b"adapter\x00" + req.adapter.encode()), skip)
            for rid, role in ((a1, "adapter-ring-1"), (a2, "adapter-ring-2")):
                rank.setdefault(rid, len(rank))
                roles.setdefault(rid, role)
        for rid, role in ((c1, "prefix-ring-1"), (c2, "prefix-ring-2")):
            rank.setdefault(rid, len(rank))
            roles.setdefault(rid, role)

        est: dict[str, tuple[ReplicaState, TtftEstimate]] = {}
        slo = self.slo_for(req)
        tie_slo = p.tie_tolerance_slo * slo

        def evaluate(r: ReplicaState) -> None:
            if r.replica_id not in est:
                est[r.replica_id] = (
                    r,
                    estimate_ttft(
                        r, req, now, max_age=age, chunk_tokens=chunk, adapter_mb=adapter_mb, slot_wait=True
                    ),
                )

        def best_of(
            pool: list[tuple[ReplicaState, TtftEstimate]] | None = None,
        ) -> tuple[ReplicaState, TtftEstimate]:
            items = list(est.values()) if pool is None else pool
            lo = min(e.total_s for _, e in items)
            tol = lo + max(p.tie_tolerance_s, p.tie_tolerance_rel * lo, tie_slo)
            if p.slo_guard and lo <= slo:
                tol = min(tol, max(slo, lo + p.tie_tolerance_s))
            near = [t for t in items if t[1].total_s <= tol]
            if len(near) == 1:
                return near[0]
            # Near-ties: more reuse (less fleet compute), then ring order (stable), then the estimate.
            return min(near, key=lambda t: (-t[1].cached_blocks, rank.get(t[0].replica_id, n), t[1].total_s))

        switch = p.switch_fraction * slo
        by_id = fw.by_id
        for rid in rank:  # the affinity set first
            evaluate(by_id[rid])
        aff_r, aff = best_of()
        least: ReplicaState | None = None
        if n <= p.narrow_above:
            for r in cands:
                evaluate(r)
            scope = f"all {n}"
        elif aff.total_s > switch:
            least = self._least_loaded(cands, now)
            roles.setdefault(least.replica_id, "least-loaded")
            evaluate(least)
            if req.adapter is not None:
                holders = [r for r in cands if req.adapter in r.adapters_gpu]
                if holders:
                    h = self._least_loaded(holders, now)
                    roles.setdefault(h.replica_id, "adapter-resident")
                    evaluate(h)
            scope = f"affinity set + least loaded, {len(est)} of {n}"
        else:
            scope = f"affinity set, {len(est)} of {n}"
        best_r, best = best_of()
        if (
            best_r is not aff_r
            and aff.total_s <= switch
            and best.total_s > (1 - p.affinity_gain) * aff.total_s
        ):
            # Stay with the ring candidates unless leaving them saves a real share of the TTFT: hot shared
            # prefixes (Mooncake's block 0) otherwise pull every cold request onto one replica.
            reason = (
                f"affinity: {aff_r.replica_id} {aff.total_s:.3f}s within {p.affinity_gain:.0%} of "
                f"{best_r.replica_id} {best.total_s:.3f}s ({scope})"
            )
            best_r, best = aff_r, aff
        else:
            lo = min(e.total_s for _, e in est.values())
            if best.total_s > lo:
                reason = (
                    f"near-tie: {best.total_s:.3f}s is within the tie window of the lowest estimate "
                    f"{lo:.3f}s, and has more cached blocks ({best.cached_blocks}) or comes first in ring "
                    f"order ({scope})"
                )
            else:
                reason = f"min estimated TTFT {best.total_s:.3f}s ({scope})"
        chosen, chosen_e = best_r, best

        if p.hotspot_c is not None and chosen_e.queue_s > p.hotspot_floor_slo * slo:
            # Bound the prefill *seconds* queued ahead (GPU-speed weighted by construction): decoding
            # requests are cheap and must not push a conversation's next turn off its cache.
            fleet_s = chosen_e.prefill_s
            for r in cands:
                hit = est.get(r.replica_id)
                fleet_s += hit[1].queue_s if hit is not None else queue_seconds(r, now, age, chunk)
            cap_s = max(p.hotspot_floor_slo * slo, p.hotspot_c * fleet_s / n)
            if chosen_e.queue_s > cap_s:
                ordered = sorted(est.values(), key=lambda t: (t[1].total_s, rank.get(t[0].replica_id, n)))
                alt = next((t for t in ordered if t[1].queue_s <= cap_s), None)
                if alt is None:
                    lr = self._least_loaded(cands, now)
                    roles.setdefault(lr.replica_id, "least-loaded")
                    evaluate(lr)
                    alt = est[lr.replica_id]
                if alt[0] is not chosen and not (p.slo_guard and alt[1].total_s > slo >= chosen_e.total_s):
                    reason = (
                        f"hotspot guard: {chosen.replica_id} queue {chosen_e.queue_s:.3f}s > cap {cap_s:.3f}s"
                        " "
                        f"({p.hotspot_c:g} x fleet mean pending prefill) -> {alt[0].replica_id} "
                        f"({alt[1].total_s:.3f}s); was: {reason}"
                    )
                    chosen, chosen_e = alt
        if best.total_s > slo:
            reason += f"; estimate over SLO {slo:.3f}s"

        trace: list[CandidateCost] | None = None
        if explain:
            trace = []
            for r, e in sorted(est.values(), key=lambda t: (t[1].total_s, rank.get(t[0].replica_id, n))):
                trace.append(
                    cost_of(
                        r,
                        e,
                        role=roles.get(r.replica_id, "-"),
                        outstanding=len(r.in_flight),
                        uncached_tokens=e.uncached_tokens,
                        chosen=r is chosen,
                    )
                )
        return self.decision(req, chosen, reason, cached_blocks=chosen_e.cached_blocks, candidates=trace)

    def _least_loaded(self, cands: list[ReplicaState], now: float) -> ReplicaState:
        age, chunk = self.params.sample_max_age_s, self.params.chunk_tokens
        best_r = cands[0]
        best: tuple[float, int] = (math.inf, 0)
        for r in cands:
            q = queue_seconds(r, now, age, chunk) if r.pending_prefill_tokens or r.last_sample else 0.0
            k = (q, len(r.in_flight))
            if k < best:
                best_r, best = r, k
        return best_r
