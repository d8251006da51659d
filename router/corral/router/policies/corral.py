"""``corral``: the Corral cost model. One number in seconds per candidate replica, the minimum wins.

    cost(r) = ttft(r) + prefill_s(r) x behind(r) + adapter_s(r) x in_flight(r)

    ttft(r)   this request's predicted TTFT on r:
              queue_s    prefill work already queued on r (pending uncached tokens x b1, in chunks of
                         ``chunk_tokens`` per step, each step also paying b0 + b2 x the running decodes)
            + prefill_s  its own uncached tokens (prompt minus the longest cached prefix) on r's GPU class
            + adapter_s  0 if the adapter is GPU-resident, else the profile's CPU->GPU or disk->GPU load
                         time for its size, plus the expected wait for a LoRA slot when every slot holds
                         an adapter with requests in flight (``adapter_slot_wait_s``)
    behind(r) how many requests its prefill delays: the requests waiting on r for their first token now.
              In steady state (Little's law) as many arrive at r during one wait as wait there now, so
              this is the expected number of requests that will queue behind this one on r.
    in_flight(r) how many requests an adapter load delays: every request on r (a load stalls the whole
              batch, as in vLLM's worker), the engine's running + waiting when its sample is larger.

So the cost is the total TTFT, summed over this request and the requests it delays, that sending it to
r is expected to cost, in seconds, with an H100 and an L4 compared in the same unit. What earlier
versions did with hand-set windows and guards follows from it:

- *cache first under load*: a cache miss costs its prefill once in ``ttft`` and again for every request
  that will wait behind it, so on a busy fleet a replica holding the prefix wins unless its queue is longer by
  more than the miss costs everyone (the old near-tie window, now sized by the load, not by the SLO);
- *balance when idle*: with nothing waiting, the cost is the TTFT alone (join the shortest queue in
  seconds, GPU speed included);
- *hotspots*: a hot replica's queue_s and behind(r) both grow with every request it takes, so the cost
  of piling on rises quadratically and the next replica takes over;
- *adapter affinity*: loading an adapter on a busy replica costs the load (and any slot wait) once for
  every request on it, so adapters stay on the replicas that hold them unless those are overloaded.

Exact ties (an idle fleet, a cold prompt) go to the candidate with more cached blocks, then to the
request's dual-ring candidates in ring order (the adapter's pair first, then the adaptive prefix key's,
see ``HotPrefixKeyer``), so an idle or uniform fleet maps keys by the rings and a join/leave moves only
~1/N of the prefixes.

Remaining parameters (units and reasons): ``narrow_above`` (replicas): above it only the ring
candidates, the least-loaded replica and the least-loaded holder of the adapter are evaluated, which
keeps a decision O(1) prefix matches on large pools (a compute bound, not a tuning knob; every replica is
evaluated at or below it). Above it the replica that last took the request's prefix key is priced too
(its *home*: where the next turn of a conversation finds its cache). ``hotspot_c`` (dimensionless, the
RoutingPolicy's ``load.hotspotFactor``): an operator's hard bound on imbalance, not part of the cost: a
request whose queue on the pick is over its SLO and over ``hotspot_c`` x the fleet mean of pending
prefill seconds goes to the cheapest replica under that cap (its effect: ``corral bench ablation``).
``ttft_slo_s`` / ``slo_classes`` only label
decisions whose estimate is over the SLO and bound the hotspot cap from below. ``chunk_tokens`` and
``adapter_mb`` are the engine's step budget and the default adapter size when a request does not carry
one. The prefix-key parameters (``key_block_tokens`` 512 tokens, ``window`` 200 requests,
``min_samples`` 20, ``expand_factor`` 2 and ``merge_factor`` 1 as multiples of 1/n, ``vnodes`` 160) are
DualMap's published values and only decide ring order among exact ties.
"""

from __future__ import annotations

import math
from collections import OrderedDict

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
    request_load,
    unit_blocks,
    waiting_load,
)

_xxh = xxhash.xxh3_64_intdigest
_MAX_HOMES = 100_000
"""Prefix keys whose last pick is remembered on large pools (LRU; ~10 MB at most)."""


class CorralParams(PolicyParams):
    ttft_slo_s: float = Field(2.0, gt=0.0)
    slo_classes: dict[str, float] = Field(default_factory=dict)
    """TTFT SLO in seconds per ``RoutingRequest.slo_class``; other classes use ``ttft_slo_s``."""
    narrow_above: int = Field(16, ge=1)
    """Replicas: above this only the ring candidates, the least loaded and the adapter holder are priced."""
    hotspot_c: float | None = Field(3.0, gt=1.0)
    """Hard bound: queued prefill seconds on the pick over the SLO may be at most ``hotspot_c`` x the fleet
    mean pending prefill seconds (this request included); ``None`` disables it."""
    charge_waiting: bool = True
    """Ablation switch: False prices this request's TTFT alone (``corral bench ablation``)."""
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
    """Per-model data that only changes with membership: the rings and the replicas by id."""

    __slots__ = ("by_id", "rings")

    def __init__(self, rings: DualRing, cands: list[ReplicaState]) -> None:
        self.rings = rings
        self.by_id = {r.replica_id: r for r in cands}


class _Priced:
    """One candidate's cost terms."""

    __slots__ = ("behind", "cost_s", "e", "r", "stalled")

    def __init__(self, r: ReplicaState, e: TtftEstimate, behind: int, stalled: int) -> None:
        self.r, self.e, self.behind, self.stalled = r, e, behind, stalled
        self.cost_s = e.total_s + e.prefill_s * behind + e.adapter_s * stalled


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
        self._home: OrderedDict[tuple[str, int], str] = OrderedDict()  # (model, prefix key) -> last pick

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
        rank: dict[str, int] = {}
        roles: dict[str, str] = {}
        if req.adapter is not None:
            a1, a2 = fw.rings.pair(_xxh(b"adapter\x00" + req.adapter.encode()), skip)
            for rid, role in ((a1, "adapter-ring-1"), (a2, "adapter-ring-2")):
                rank.setdefault(rid, len(rank))
                roles.setdefault(rid, role)
        c1, c2 = fw.rings.pair(key, skip)
        for rid, role in ((c1, "prefix-ring-1"), (c2, "prefix-ring-2")):
            rank.setdefault(rid, len(rank))
            roles.setdefault(rid, role)

        priced: dict[str, _Priced] = {}

        def price(r: ReplicaState) -> _Priced:
            got = priced.get(r.replica_id)
            if got is None:
                e = estimate_ttft(
                    r, req, now, max_age=age, chunk_tokens=chunk, adapter_mb=adapter_mb, slot_wait=True
                )
                if p.charge_waiting:
                    behind = waiting_load(r, now, age)
                    stalled = request_load(r, now, age) if e.adapter_s > 0 else 0
                else:
                    behind = stalled = 0
                got = priced[r.replica_id] = _Priced(r, e, behind, stalled)
            return got

        if n <= p.narrow_above:
            for r in cands:
                price(r)
            scope = f"all {n}"
        else:
            by_id = fw.by_id
            for rid in rank:
                price(by_id[rid])
            home = self._home.get((req.model, key))
            if home is not None and home in by_id and home not in skip:
                roles.setdefault(home, "prefix-home")
                price(by_id[home])
            least = self._least_loaded(cands, now)
            roles.setdefault(least.replica_id, "least-loaded")
            price(least)
            if req.adapter is not None:
                holders = [r for r in cands if req.adapter in r.adapters_gpu]
                if holders:
                    h = self._least_loaded(holders, now)
                    roles.setdefault(h.replica_id, "adapter-resident")
                    price(h)
            scope = f"{len(priced)} of {n}"

        def order(c: _Priced) -> tuple[float, int, int]:
            return (c.cost_s, -c.e.cached_blocks, rank.get(c.r.replica_id, n))

        best = min(priced.values(), key=order)
        reason = (
            f"min cost {best.cost_s:.3f}s = TTFT {best.e.total_s:.3f}s + prefill "
            f"{best.e.prefill_s:.3f}s x {best.behind} waiting"
        )
        if best.e.adapter_s > 0:
            reason += f" + adapter {best.e.adapter_s:.3f}s x {best.stalled} in flight"
        reason += f" ({scope})"
        chosen = best
        slo = self.slo_for(req)
        if p.hotspot_c is not None and chosen.e.queue_s > slo:
            fleet_s = chosen.e.prefill_s
            for r in cands:
                got = priced.get(r.replica_id)
                fleet_s += got.e.queue_s if got is not None else queue_seconds(r, now, age, chunk)
            cap_s = max(slo, p.hotspot_c * fleet_s / n)
            if chosen.e.queue_s > cap_s:
                under = [c for c in priced.values() if c.e.queue_s <= cap_s]
                alt = min(under, key=order) if under else price(self._least_loaded(cands, now))
                roles.setdefault(alt.r.replica_id, "least-loaded")
                if alt is not chosen:
                    reason = (
                        f"hotspot bound: {chosen.r.replica_id} queue {chosen.e.queue_s:.3f}s > cap "
                        f"{cap_s:.3f}s "
                        f"({p.hotspot_c:g} x fleet mean pending prefill) -> {alt.r.replica_id}; was: {reason}"
                    )
                    chosen = alt
        if chosen.e.total_s > slo:
            reason += f"; estimate over SLO {slo:.3f}s"
        if n > p.narrow_above:
            homes = self._home
            homes[(req.model, key)] = chosen.r.replica_id
            homes.move_to_end((req.model, key))
            if len(homes) > _MAX_HOMES:
                homes.popitem(last=False)

        trace: list[CandidateCost] | None = None
        if explain:
            trace = [
                cost_of(
                    c.r,
                    c.e,
                    role=roles.get(c.r.replica_id, "-"),
                    cost_s=round(c.cost_s, 6),
                    waiting=c.behind,
                    in_flight=c.stalled,
                    outstanding=len(c.r.in_flight),
                    uncached_tokens=c.e.uncached_tokens,
                    chosen=c is chosen,
                )
                for c in sorted(priced.values(), key=order)
            ]
        return self.decision(req, chosen.r, reason, cached_blocks=chosen.e.cached_blocks, candidates=trace)

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
