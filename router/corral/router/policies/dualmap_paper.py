"""``dualmap_paper``: DualMap (Yuan et al., ICLR 2026) with its router-side queues and hotspot migration.

``dualmap`` (:mod:`.dualmap`) is steps 1-3 and dispatches at once ("DualMap without rebalancing"). This
policy adds steps 4-5 as the paper and the authors' code describe them (shared/docs/papers.md; [R] = the
paper via write-ups, [C] = the authors' code), on the router core's held queues
(:mod:`corral.router.holding`):

- **Load** [C]: ``pending(i)`` = uncached tokens dispatched to i and not yet prefilled (``token_load``)
  plus the uncached tokens in i's router queue; TTFT(r, i) = tpct_i x (pending(i) + uncached(r, i)) [R eq. 7].
  ``tpct`` (``prefill_tpot``) is the replica profile's per-token prefill time ``b1`` unless ``tpct_s`` is
  set (the paper profiles it per NPU/model: 0.00016 s/token for 910B4 + Qwen2.5-7B [C]).
- **Selection** [R §3.2]: as ``dualmap`` (cache affinity until the warm candidate's TTFT exceeds
  ``switch_fraction`` x SLO; paper 1.0, code 0.5), computed on the load above.
- **Step 4, enqueue and dispatch** [C]: the request joins the chosen replica's router queue (longest cached
  prefix there first, then arrival), remembering its other candidate. A replica's queue head is released
  when (a) fewer than ``pending_req_threshold`` (1, [C] ``dh_replica_pending_req_threshold``) dispatched
  requests there still wait for their first token, (b) its dispatched pending prefill tokens stay within
  the token budget SLO/tpct (31,250 tokens for 5 s at 0.00016 s/token [C]; a lone request larger than the
  budget still goes to an empty replica) and (c) the replica is idle or its last prefill completed less
  than ``busy_prefill_interval_s`` (2 s, [C]) ago: the decode-bottleneck guard [R App. A].
- **Step 5, hotspot-aware rebalancing** [R §3.3, App. A.1; triggers from C]: a replica is overloaded when
  its pending TTFT exceeds the SLO (``rebalance_fraction`` x SLO; [C] ``dh_rebalance_thredhold`` = SLO) or
  its oldest queued request has waited ``max_wait_s`` (3 s, [C]). Rebalancing runs (a) after a routing
  decision whose both candidates are overloaded and (b) in every release pass, for each overloaded replica
  with more than one queued request. For each request r queued on overloaded i with other candidate j,
  B = TTFT(r, i) - TTFT(r, j) (TTFT(r, i) counts the queue ahead of r; TTFT(r, j) appends r to j's queue);
  eligible when B > 0, TTFT(r, j) < SLO and j is not overloaded [R]. Eligible requests move in descending
  B, as one non-recursive batch (nothing on j is displaced), until i is no longer overloaded [R]. Only the
  request's own pair is considered (the fork's ring-neighbour fallback is not followed).

Not reproduced: the DRAM KV tier of the paper's vLLM (the sim's CPU tier is ``--cpu-kv-gib``), the elastic
scaling trigger (not found in the paper; the rings do follow membership changes), the priority labels of
the fork.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from ..holding import Held, HeldQueues
from ..state import FleetState, ReplicaState
from ..types import Decision, RoutingRequest
from ._common import token_load
from .dualmap import DualMap, DualMapParams


class DualMapPaperParams(DualMapParams):
    pending_req_threshold: int = Field(1, ge=1)
    busy_prefill_interval_s: float = Field(2.0, gt=0.0)
    rebalance_fraction: float = Field(1.0, gt=0.0)
    max_wait_s: float = Field(3.0, gt=0.0)


class DualMapPaper(DualMap):
    name = "dualmap_paper"
    Params = DualMapPaperParams
    category = "BALANCE"
    params: DualMapPaperParams
    holds_requests = True

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.queues = HeldQueues()  # replaced by the router core's queues (RouterCore binds it)

    # ---- the TTFT model ------------------------------------------------------------------------------
    def tpct(self, r: ReplicaState) -> float:
        """Seconds per uncached prefill token on ``r`` (``prefill_tpot``)."""
        return self.params.tpct_s if self.params.tpct_s is not None else max(r.profile.b1_us, 1e-3) * 1e-6

    def dispatched(self, r: ReplicaState, now: float) -> int:
        return token_load(r, now, self.params.sample_max_age_s)

    def pending(self, r: ReplicaState, now: float) -> int:
        return self.dispatched(r, now) + self.queues.queued_tokens(r.replica_id)

    def _ttft(self, r: ReplicaState, uncached: int, now: float) -> tuple[float, int]:
        pending = self.pending(r, now)
        return self.tpct(r) * (pending + uncached), pending

    def overloaded(self, r: ReplicaState, now: float) -> bool:
        p = self.params
        slo = p.rebalance_fraction * p.ttft_slo_s
        return (
            self.tpct(r) * self.pending(r, now) > slo
            or self.queues.oldest_wait(r.replica_id, now) >= p.max_wait_s
        )

    @staticmethod
    def _split(r: ReplicaState, rr: RoutingRequest) -> tuple[int, int]:
        cached = min(rr.prompt_tokens, r.index.match(rr.block_hashes) * r.block_size)
        return cached, max(0, rr.prompt_tokens - cached)

    # ---- step 4: enqueue and dispatch ----------------------------------------------------------------
    def enqueue(
        self, rr: RoutingRequest, decision: Decision, fleet: FleetState, queues: HeldQueues, now: float
    ) -> Held:
        rid = decision.replica_id
        pair = self.last_pair or (rid, rid)
        backup = pair[1] if pair[0] == rid else pair[0]
        r = fleet.replicas[rid]
        cached, uncached = self._split(r, rr)
        h = Held(rr, decision, rid, now, cached, uncached)  # held from now (the router's clock)
        h.backup = backup if backup != rid else None
        queues.push(h)
        b = fleet.replicas.get(backup)
        if b is not None and b.healthy and self.overloaded(r, now) and self.overloaded(b, now):
            self.rebalance(r, fleet, queues, now)  # trigger (a): both candidates overloaded
        return h

    def release(self, fleet: FleetState, queues: HeldQueues, now: float) -> list[Held]:
        out: list[Held] = []
        for rid in [k for k, q in queues.queues.items() if q]:
            r = fleet.replicas.get(rid)
            if r is None or not r.healthy:
                continue  # the router core re-routes requests held for a replica that left
            if len(queues.queue(rid)) > 1 and self.overloaded(r, now):
                self.rebalance(r, fleet, queues, now)  # trigger (b)
        for rid in [k for k, q in queues.queues.items() if q]:
            r = fleet.replicas.get(rid)
            if r is None or not r.healthy:
                continue
            sent_waiting = 0
            sent_tokens = self.dispatched(r, now)
            while queues.queue(rid) and self._gate(r, queues, now, sent_waiting, sent_tokens):
                h = queues.pop_head(rid)
                cached, uncached = self._split(r, h.rr)
                blocks = cached // max(1, r.block_size)
                h.decision = replace(h.decision, replica_id=rid, cached_blocks=blocks)
                out.append(h)
                sent_waiting += 1
                sent_tokens += uncached
        return out

    def _gate(
        self, r: ReplicaState, queues: HeldQueues, now: float, sent_waiting: int, sent_tokens: int
    ) -> bool:
        p = self.params
        if r.waiting_requests + sent_waiting >= p.pending_req_threshold:
            return False
        head = queues.queue(r.replica_id)[0]
        budget = p.ttft_slo_s / self.tpct(r)
        if sent_tokens > 0 and sent_tokens + head.uncached_tokens > budget:
            return False
        if r.outstanding + sent_waiting == 0:
            return True
        last = queues.last_prefill_done.get(r.replica_id)
        return last is not None and now - last < p.busy_prefill_interval_s

    # ---- step 5: hotspot-aware rebalancing -----------------------------------------------------------
    def rebalance(self, src: ReplicaState, fleet: FleetState, queues: HeldQueues, now: float) -> int:
        """Move queued requests off overloaded ``src`` to their own other candidate (one batch, descending
        benefit, non-recursive); returns how many moved."""
        q = queues.queue(src.replica_id)
        if len(q) <= 1:
            return 0
        slo = self.params.ttft_slo_s
        t_src = self.tpct(src)
        ahead = self.dispatched(src, now)
        eligible: list[tuple[float, Held, ReplicaState]] = []
        for h in list(q):
            ahead += h.uncached_tokens
            tgt = fleet.replicas.get(h.backup) if h.backup is not None else None
            if tgt is None or not tgt.healthy or tgt.model != src.model or self.overloaded(tgt, now):
                continue
            _, u_tgt = self._split(tgt, h.rr)
            ttft_tgt = self.tpct(tgt) * (self.pending(tgt, now) + u_tgt)
            benefit = t_src * ahead - ttft_tgt
            if benefit > 0 and ttft_tgt < slo:
                eligible.append((benefit, h, tgt))
        eligible.sort(key=lambda e: -e[0])
        moved = 0
        for _, h, tgt in eligible:
            if not self.overloaded(src, now):
                break
            cached, u_tgt = self._split(tgt, h.rr)
            if self.tpct(tgt) * (self.pending(tgt, now) + u_tgt) >= slo:
                continue  # earlier moves of this batch filled the target
            queues.move(h, tgt.replica_id, cached, u_tgt)
            moved += 1
        return moved
