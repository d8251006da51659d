"""Shared machinery of the built-in policies: strict params, candidate lookup, load views, the TTFT
estimate in seconds, consistent-hash rings with virtual nodes, and the adaptive (hotness-driven) prefix
key of DualMap. Nothing here chooses a replica; each policy module does.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, ClassVar

import xxhash
from pydantic import BaseModel, ConfigDict, ValidationError

from ..policy import NoReplicaError, Policy
from ..state import FleetState, ReplicaState
from ..types import CandidateCost, Decision, RoutingRequest

_xxh = xxhash.xxh3_64_intdigest
_U64 = 1 << 64


class PolicyParams(BaseModel):
    """Base of every policy's params: unknown keys are an error, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    sample_max_age_s: float = 5.0
    """A replica's LoadSample is trusted for this long after the router received it."""


class BasePolicy(Policy):
    """A policy with typed params (``Params``), a seeded RNG and common helpers."""

    Params: ClassVar[type[PolicyParams]] = PolicyParams
    category: ClassVar[str] = "DISTRIBUTION"
    """AFFINITY (sticks to warm state), DISTRIBUTION (spreads load) or BALANCE (trades both)."""

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            known = ", ".join(sorted(self.Params.model_fields))
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '?'}: "
                + ("unknown parameter" if err["type"] == "extra_forbidden" else err["msg"])
                for err in e.errors()
            )
            msg = f"invalid params for policy {self.name!r}: {problems} (known params: {known})"
            raise ValueError(msg) from None
        self.rng = random.Random(self.params.seed)

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def candidates(req: RoutingRequest, fleet: FleetState) -> list[ReplicaState]:
        cands = fleet.candidates(req.model)
        if not cands:
            raise no_replica_error(req.model, fleet)
        return cands

    def decision(
        self,
        req: RoutingRequest,
        chosen: ReplicaState,
        reason: str,
        cached_blocks: int | None = None,
        candidates: list[CandidateCost] | None = None,
    ) -> Decision:
        if cached_blocks is None:
            cached_blocks = chosen.index.match(req.block_hashes)
        return Decision(chosen.replica_id, self.name, reason, cached_blocks, candidates)


def no_replica_error(model: str, fleet: FleetState) -> NoReplicaError:
    serving = [r for r in fleet.replicas.values() if r.model == model]
    if serving:
        return NoReplicaError(
            f"no healthy replica serves model {model!r} ({len(serving)} replica(s) known, all unhealthy)"
        )
    known = ", ".join(fleet.models()) or "none"
    return NoReplicaError(f"no replica serves model {model!r} (models served: {known})")


# ---- load views -------------------------------------------------------------------------------------
def fresh_sample(r: ReplicaState, now: float, max_age: float) -> Any:
    """``r``'s last load sample if it arrived at most ``max_age`` before ``now`` (both on the router's
    clock: ``FleetState.apply`` stamps each sample on receipt), else ``None``."""
    s = r.last_sample
    if s is None or now - r.sample_received_at > max_age:
        return None
    return s


def request_load(r: ReplicaState, now: float, max_age: float) -> int:
    """Outstanding requests: the router's count, or, if larger, a fresh sample's running+waiting corrected
    for what this router saw since (``ReplicaState.sample_own``)."""
    n = len(r.in_flight)
    s = fresh_sample(r, now, max_age)
    if s is not None:
        own = r.sample_own
        m = s.running + s.waiting if own is None else s.running + s.waiting - own[3] + n
        if m > n:
            return m
    return n


def waiting_load(r: ReplicaState, now: float, max_age: float) -> int:
    """Requests not yet past their first token (router count, or the corrected sample's ``waiting``)."""
    n = len(r.in_flight) - r.decode_requests
    s = fresh_sample(r, now, max_age)
    if s is not None:
        own = r.sample_own
        m = s.waiting if own is None else s.waiting - own[1] + n
        if m > n:
            return m
    return n


def token_load(r: ReplicaState, now: float, max_age: float) -> int:
    """Pending uncached prefill tokens (router count, or the corrected sample's waiting prefill tokens)."""
    n = r.pending_prefill_tokens
    s = fresh_sample(r, now, max_age)
    if s is not None:
        own = r.sample_own
        m = s.waiting_prefill_tokens if own is None else s.waiting_prefill_tokens - own[0] + n
        if m > n:
            return m
    return n


def decode_load(r: ReplicaState, now: float, max_age: float) -> int:
    """Requests past their first token (router count, or the corrected sample's ``running``)."""
    n = r.decode_requests
    s = fresh_sample(r, now, max_age)
    if s is not None:
        own = r.sample_own
        m = s.running if own is None else s.running - own[2] + n
        if m > n:
            return m
    return n


def kv_usage(r: ReplicaState, now: float, max_age: float) -> float:
    """KV-cache usage in [0, 1]: the engine's gauge when fresh, else in-flight tokens / capacity."""
    s = fresh_sample(r, now, max_age)
    if s is not None:
        return min(1.0, max(0.0, s.kv_usage))
    used = sum(f.prompt_tokens for f in r.in_flight.values())
    return min(1.0, used / max(1, r.index.capacity * r.block_size))


# ---- the TTFT estimate (seconds) ---------------------------------------------------------------------
@dataclass(slots=True)
class TtftEstimate:
    total_s: float
    queue_s: float
    prefill_s: float
    adapter_s: float
    cached_blocks: int
    uncached_tokens: int
    tier: str
    cpu_blocks: int = 0  # blocks after the GPU hit held in the replica's CPU KV tier (loaded, not computed)


def queue_seconds(r: ReplicaState, now: float, max_age: float, chunk_tokens: int) -> float:
    """Time to clear the prefill work already queued on ``r``, including decode interference.

    Step model: ``step_us = b0 + b1 * prefill_tokens + b2 * decode_tokens``; queued prefill tokens are
    processed in chunks of ``chunk_tokens`` (0: the profile's ``max_num_batched_tokens``) per step, each
    step also carrying the running decodes.
    """
    p = r.profile
    pending = token_load(r, now, max_age)
    if pending <= 0:
        return 0.0
    decode = decode_load(r, now, max_age)
    steps = -(-pending // (chunk_tokens or p.max_num_batched_tokens))
    return (pending * p.b1_us + steps * (p.b0_us + p.b2_us * decode)) * 1e-6


def estimate_ttft(
    r: ReplicaState,
    req: RoutingRequest,
    now: float,
    *,
    max_age: float,
    chunk_tokens: int,
    adapter_mb: float,
    cached_blocks: int | None = None,
    slot_wait: bool = False,
) -> TtftEstimate:
    """Estimated TTFT of ``req`` on ``r`` in seconds: queueing + own uncached prefill + adapter load.

    Blocks past the GPU hit that the replica's CPU KV tier holds (``ReplicaState.cpu_blocks``, from KV
    events with ``medium="cpu"``) are priced at their host->GPU copy time (``GpuProfile.kv_load_s``), not
    recomputed: a CPU-tier hit costs between a GPU hit (nothing) and a miss (prefill).

    With ``slot_wait``, a non-resident adapter is also charged ``adapter_slot_wait_s`` (all GPU LoRA slots
    held by adapters with requests in flight)."""
    p = r.profile
    chunk_tokens = chunk_tokens or p.max_num_batched_tokens
    if cached_blocks is None:
        cached_blocks = r.index.match(req.block_hashes)
    cpu_blocks = 0
    if r.cpu_blocks:  # a CPU KV-tier hit: copied back over PCIe instead of recomputed
        held = r.cpu_blocks
        for h in req.block_hashes[cached_blocks:]:
            if h not in held:
                break
            cpu_blocks += 1
    # vLLM recomputes at least the last token even on a full hit.
    uncached = max(1, req.prompt_tokens - (cached_blocks + cpu_blocks) * r.block_size)
    pending = token_load(r, now, max_age)
    decode = decode_load(r, now, max_age)
    per_step = p.b0_us + p.b2_us * decode
    q_steps = -(-pending // chunk_tokens) if pending > 0 else 0
    all_steps = -(-(pending + uncached) // chunk_tokens)
    queue_s = (pending * p.b1_us + q_steps * per_step) * 1e-6
    prefill_s = (uncached * p.b1_us + (all_steps - q_steps) * per_step) * 1e-6
    if cpu_blocks:
        prefill_s += p.kv_load_s(cpu_blocks * r.block_size)
    tier = r.adapter_tier(req.adapter)
    adapter_s = 0.0 if tier == "gpu" else float(p.adapter_load_s(adapter_mb, tier))  # type: ignore[arg-type]
    if slot_wait and tier != "gpu":
        adapter_s += adapter_slot_wait_s(r, decode)
    return TtftEstimate(
        queue_s + prefill_s + adapter_s,
        queue_s,
        prefill_s,
        adapter_s,
        cached_blocks,
        uncached,
        tier,
        cpu_blocks,
    )


def adapter_slot_wait_s(r: ReplicaState, decode: int) -> float:
    """Expected wait for a GPU LoRA slot on ``r`` for an adapter that is not GPU-resident.

    0 while a slot is free or held by an adapter with nothing in flight (it can be evicted at once). When
    every one of the ``max_gpu_adapters`` slots holds an adapter with requests in flight, a batch cannot
    take another adapter until one drains: the estimate is the soonest-draining adapter's longest remaining
    decode (``max_tokens``, or half of it once the first token was seen) at the current step time
    ``b0 + b2 x decodes``.
    """
    gpu = r.adapters_gpu
    if len(gpu) < r.max_gpu_adapters:
        return 0.0
    left: dict[str, int] = {}
    for f in r.in_flight.values():
        a = f.adapter
        if a is not None and a in gpu:
            t = f.max_tokens // 2 if f.started else f.max_tokens
            if t > left.get(a, 0):
                left[a] = t
    if len(left) < len(gpu):
        return 0.0
    p = r.profile
    return min(left.values()) * (p.b0_us + p.b2_us * decode) * 1e-6


def cost_of(r: ReplicaState, e: TtftEstimate, **extra: Any) -> CandidateCost:
    return CandidateCost(
        replica_id=r.replica_id,
        gpu_class=r.gpu_class,
        total_s=e.total_s,
        queue_s=e.queue_s,
        prefill_s=e.prefill_s,
        adapter_s=e.adapter_s,
        cached_blocks=e.cached_blocks,
        adapter_tier=e.tier,
        extra=dict(extra),
    )


def explain_costs(
    req: RoutingRequest, cands: Sequence[ReplicaState], now: float, scores: dict[str, dict[str, Any]]
) -> list[CandidateCost]:
    """For baselines' traces: the shared TTFT estimate per candidate plus the policy's own scores."""
    out = []
    for r in cands:
        e = estimate_ttft(r, req, now, max_age=5.0, chunk_tokens=0, adapter_mb=85.0)
        out.append(cost_of(r, e, **scores.get(r.replica_id, {})))
    return out


# ---- consistent hashing --------------------------------------------------------------------------------
def key_position(key: int, seed: int) -> int:
    return _xxh((key % _U64).to_bytes(8, "little"), seed)


class HashRing:
    """A consistent-hash ring with ``vnodes`` virtual nodes per node (xxh3 positions under ``seed``).

    Adding or removing one of N nodes only remaps the keys on that node's arcs (~1/N of all keys).
    """

    __slots__ = ("_nodes", "_owner", "_pos", "seed")

    def __init__(self, nodes: Sequence[str], vnodes: int = 160, seed: int = 0) -> None:
        self.seed = seed
        pts = sorted((_xxh(f"{n}#{v}".encode(), seed), n) for n in nodes for v in range(vnodes))
        self._pos = [p for p, _ in pts]
        self._owner = [n for _, n in pts]
        self._nodes = sorted(set(nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    def lookup(self, key: int, skip: AbstractSet[str] = frozenset()) -> str:
        """The clockwise-nearest node of ``key`` (a 64-bit key, re-hashed under the ring's seed) that is
        not in ``skip`` (``KeyError`` if every node is)."""
        i = bisect_right(self._pos, key_position(key, self.seed))
        node = self._owner[i % len(self._owner)]
        if node not in skip:
            return node
        for node in self.walk(key):
            if node not in skip:
                return node
        raise KeyError("every ring node is excluded")

    def walk(self, key: int) -> Iterator[str]:
        """Distinct nodes clockwise from ``key``'s position (for bounded loads)."""
        n = len(self._owner)
        start = bisect_right(self._pos, key_position(key, self.seed))
        seen: set[str] = set()
        for k in range(n):
            node = self._owner[(start + k) % n]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self._nodes):
                    return


class DualRing:
    """Two independent rings (seeds 1 and 2): the DualMap candidate pair of a key.

    On a collision the second candidate is the next node in stable (sorted id) order.
    """

    __slots__ = ("nodes", "r1", "r2")

    def __init__(self, nodes: Sequence[str], vnodes: int = 160) -> None:
        self.nodes = sorted(nodes)
        self.r1 = HashRing(self.nodes, vnodes, seed=1)
        self.r2 = HashRing(self.nodes, vnodes, seed=2)

    def pair(self, key: int, skip: AbstractSet[str] = frozenset()) -> tuple[str, str]:
        """The two candidates of ``key``, skipping nodes in ``skip`` (equal only if one node is left)."""
        c1 = self.r1.lookup(key, skip)
        c2 = self.r2.lookup(key, skip)
        if c1 == c2:
            nodes = self.nodes
            k = nodes.index(c1)
            for j in range(1, len(nodes)):
                cand = nodes[(k + j) % len(nodes)]
                if cand not in skip:
                    c2 = cand
                    break
        return c1, c2


class RingCache:
    """Rebuilds rings only when the fleet object, its membership/health version or the candidates change."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._cache: dict[str, tuple[FleetState, int, tuple[str, ...], Any]] = {}

    def get(self, model: str, fleet: FleetState) -> Any:
        """The ring over ``fleet``'s healthy *members* of ``model``: a view hiding replicas (a retry's
        exclusions) shares its fleet's ring, and lookups skip the hidden ones (``fleet.excluded``)."""
        fleet = fleet.base
        hit = self._cache.get(model)
        if hit is not None and hit[0] is fleet and hit[1] == fleet.version:
            return hit[3]
        ids = tuple(r.replica_id for r in fleet.members(model))
        ring = hit[3] if hit is not None and hit[2] == ids else self._factory(ids)
        self._cache[model] = (fleet, fleet.version, ids, ring)
        return ring


# ---- prefix keys --------------------------------------------------------------------------------------
def fallback_key(req: RoutingRequest) -> int:
    """Key for a prompt without a full key block: no reuse possible, so spread by request id."""
    return _xxh(req.request_id.encode())


def fixed_prefix_key(req: RoutingRequest, key_blocks: int) -> int:
    """The chained hash of the first ``key_blocks`` blocks (or of all full blocks if fewer)."""
    hs = req.block_hashes
    if not hs:
        return fallback_key(req)
    return hs[min(len(hs), max(1, key_blocks)) - 1]


class HotPrefixKeyer:
    """DualMap's adaptive prefix key (DualMap paper §3, "prefix hotness").

    The key is the first ``L`` key units of the prompt (a key unit is ``unit`` blocks, 512 tokens in the
    paper). Starting at depth 1, descend while the node for the first ``L`` units is marked expanded.
    Every routed request is recorded in a sliding window, counting each node on its key path. A node
    whose windowed share exceeds ``expand_share(n)`` (paper: 2/n) is expanded, so later requests with that
    prefix hash one more unit; an expanded node on a request's path whose share falls below
    ``merge_share(n)`` (paper: 1/n) is merged back. Decisions start after ``min_samples`` requests.
    """

    def __init__(
        self,
        window: int = 200,
        min_samples: int = 20,
        expand_factor: float = 2.0,
        merge_factor: float = 1.0,
        expand_share: float | None = None,
        merge_share: float | None = None,
        max_expanded: int = 10_000,
    ) -> None:
        self.window = window
        self.min_samples = min_samples
        self.expand_factor = expand_factor
        self.merge_factor = merge_factor
        self.expand_share_abs = expand_share
        self.merge_share_abs = merge_share
        self.max_expanded = max_expanded
        self._win: deque[tuple[int, ...]] = deque()
        self._counts: dict[int, int] = {}
        self.expanded: OrderedDict[int, None] = OrderedDict()

    def key(self, hashes: Sequence[int], unit: int, n: int) -> tuple[int, int] | None:
        """(depth in key units, key hash) for a prompt's block hashes, recording it; None if too short."""
        units = len(hashes) // unit
        if units == 0:
            return None
        expanded = self.expanded
        d = 1
        while d < units and hashes[d * unit - 1] in expanded:
            d += 1
        path = tuple(hashes[i * unit - 1] for i in range(1, d + 1))
        self._record(path)
        w = len(self._win)
        if w >= self.min_samples and n > 0:
            counts = self._counts
            hot = self.expand_share_abs if self.expand_share_abs is not None else self.expand_factor / n
            cold = self.merge_share_abs if self.merge_share_abs is not None else self.merge_factor / n
            node = path[-1]
            if d < units and counts.get(node, 0) / w > hot:
                expanded[node] = None
                if len(expanded) > self.max_expanded:
                    expanded.popitem(last=False)
            for anc in path[:-1]:
                if counts.get(anc, 0) / w < cold:
                    expanded.pop(anc, None)
                else:
                    expanded.move_to_end(anc)
        return d, path[-1]

    def _record(self, path: tuple[int, ...]) -> None:
        counts = self._counts
        self._win.append(path)
        for h in path:
            counts[h] = counts.get(h, 0) + 1
        if len(self._win) > self.window:
            for h in self._win.popleft():
                c = counts[h] - 1
                if c:
                    counts[h] = c
                else:
                    del counts[h]


def unit_blocks(key_block_tokens: int, block_size: int) -> int:
    return max(1, key_block_tokens // max(1, block_size))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bounded_cap(c: float, total: float, weight: float, weight_sum: float, floor: float) -> float:
    """CHBL capacity of one node: ``c`` times its (weighted) share of the load after this request."""
    return max(floor, math.ceil(c * (total + 1) * weight / max(weight_sum, 1e-12)))
