"""Per-replica routing state, rebuilt from what a router sent and what engines report.

`FleetState` is the only mutable state a policy reads. It is fed by:
- ``on_dispatch`` / ``on_first_token`` / ``on_finish`` (the router's own accounting of what it sent);
- ``apply(event)`` with engine events (:mod:`corral.router.events`): KV blocks stored/removed,
  adapters loaded/unloaded, load samples.

Each replica keeps a prefix index in one of two modes behind one interface:
- ``approximate``: the router records the blocks it sent to a replica, LRU-bounded by the replica's
  KV capacity (SGLang / GIE "approximate prefix" style; needs no engine events);
- ``precise``: engine ``BlockStored`` / ``BlockRemoved`` events are the truth (llm-d style); blocks the
  router just sent count as held until the engine confirms them or ``CONFIRM_GRACE_S`` passes, so the
  milliseconds before the events arrive do not look cold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Literal

from corral.api.profiles import GpuProfile

from .events import (
    AdapterLoaded,
    AdapterUnloaded,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    LoadSample,
)
from .types import RoutingRequest

IndexMode = Literal["approximate", "precise"]

CONFIRM_GRACE_S = 10.0
"""Precise mode: seconds a dispatched block counts as held before the engine's BlockStored confirms it.
Long enough for a queued prefill to run (requests waiting longer than this are already far over any
TTFT SLO); an unconfirmed block is dropped after it, so a failed or rejected request leaves no trace."""


class PrefixIndex:
    """Set of block hashes held by one replica, with LRU order (most recent last) and a capacity.

    Blocks of one chain are inserted and touched *tail first*, so a block is never less recent than
    any block after it in a chain it was seen in, and LRU eviction removes tails before their
    prefixes (what vLLM does when it frees a request's blocks). An index fed only that way is
    *prefix-closed* (a block present implies its chain ancestors are present), which lets
    :meth:`match` find the longest leading run with a galloping search in O(log n) lookups instead of
    walking every block. ``prefix_closed`` is set by the owner (``FleetState`` sets it in approximate
    mode); an index fed by engine events (precise mode) may hold holes and is matched exactly.
    """

    __slots__ = ("_blocks", "capacity", "prefix_closed")

    def __init__(self, capacity_blocks: int, prefix_closed: bool = False) -> None:
        self.capacity = max(1, capacity_blocks)
        self.prefix_closed = prefix_closed
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """Length of the longest leading run of ``hashes`` present here."""
        blocks = self._blocks
        n = len(hashes)
        if n == 0 or hashes[0] not in blocks:
            return 0
        if not self.prefix_closed:
            # Exact walk; takewhile keeps the loop in C (about 1.5x faster than a Python for-loop).
            return len(list(takewhile(blocks.__contains__, hashes)))
        # Galloping search on a monotone predicate: present(i) for i < answer, absent after.
        lo = 1  # hashes[:lo] known present
        step = 1
        while True:
            probe = lo + step  # candidate count: hashes[probe - 1] present?
            if probe >= n:
                if hashes[n - 1] in blocks:
                    return n
                hi = n - 1  # count <= n - 1
                break
            if hashes[probe - 1] in blocks:
                lo = probe
                step <<= 1
            else:
                hi = probe - 1
                break
        while lo < hi:  # invariant: count in [lo, hi]
            mid = (lo + hi + 1) >> 1
            if hashes[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_exact(self, hashes: Sequence[int]) -> int:
        """Longest leading run by walking every block (ignores ``prefix_closed``; for tests/audits)."""
        return len(list(takewhile(self._blocks.__contains__, hashes)))

    def insert(self, hashes: Iterable[int], evict: bool = True) -> None:
        """Insert a chain (given head first); it is applied tail first, see the class docstring."""
        blocks = self._blocks
        seq = hashes if isinstance(hashes, Sequence) else list(hashes)
        for h in reversed(seq):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        if evict:
            while len(blocks) > self.capacity:
                blocks.popitem(last=False)

    def touch(self, hashes: Iterable[int]) -> None:
        blocks = self._blocks
        seq = hashes if isinstance(hashes, Sequence) else list(hashes)
        for h in reversed(seq):
            if h in blocks:
                blocks.move_to_end(h)

    def remove(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._blocks.pop(h, None)

    def clear(self) -> None:
        self._blocks.clear()


@dataclass(slots=True)
class InFlight:
    prompt_tokens: int
    uncached_tokens: int
    max_tokens: int
    adapter: str | None
    started: bool = False


@dataclass(slots=True)
class ReplicaState:
    """What a router knows about one engine replica."""

    replica_id: str
    model: str
    gpu_class: str
    profile: GpuProfile
    block_size: int
    index: PrefixIndex
    address: str = ""
    healthy: bool = True
    adapters_gpu: set[str] = field(default_factory=set)
    adapters_cpu: set[str] = field(default_factory=set)
    max_gpu_adapters: int = 4
    max_cpu_adapters: int | None = None  # the engine's host adapter cache (vLLM max_cpu_loras); None: unknown
    in_flight: dict[str, InFlight] = field(default_factory=dict)
    pending_prefill_tokens: int = 0  # uncached prompt tokens sent, first token not yet seen
    decode_requests: int = 0  # requests past their first token, still generating
    last_sample: LoadSample | None = None
    sample_received_at: float = 0.0  # when ``last_sample`` arrived, on the router's clock (see apply)
    sample_own: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    """This router's own (pending prefill tokens, waiting, decoding, in-flight) on the replica when
    ``last_sample`` arrived: the policies read a sample as ``sample - sample_own + own now`` (the load it
    counts that is not this router's, plus this router's live counts), so requests this router saw start or
    finish after the engine counted no longer look queued (``corral.router.policies._common``). ``None``:
    the sample already adds this router's live counts (a backend scrape, ``backends.load.ScrapedLoad``)."""
    dispatched_total: int = 0
    unconfirmed: dict[int, float] = field(default_factory=dict)  # precise mode: block -> confirm deadline
    cpu_blocks: set[int] = field(default_factory=set)  # precise mode: blocks in the CPU KV tier (medium cpu)

    @property
    def outstanding(self) -> int:
        return len(self.in_flight)

    def set_sample(self, sample: LoadSample, received_at: float, live: bool = False) -> None:
        """Take a load sample received at ``received_at`` (router clock); ``live``: it already counts this
        router's requests live (see ``sample_own``)."""
        self.last_sample = sample
        self.sample_received_at = received_at
        self.sample_own = None if live else (
            self.pending_prefill_tokens, len(self.in_flight) - self.decode_requests,
            self.decode_requests, len(self.in_flight),
        )  # fmt: skip

    @property
    def waiting_requests(self) -> int:
        """Requests sent here whose first token has not been seen yet (router view)."""
        return len(self.in_flight) - self.decode_requests

    def adapter_tier(self, adapter: str | None) -> str:
        if adapter is None or adapter in self.adapters_gpu:
            return "gpu"
        if adapter in self.adapters_cpu:
            return "cpu"
        return "disk"


class FleetState:
    """All replicas one router knows, keyed by replica id."""

    def __init__(
        self, index_mode: IndexMode = "approximate", clock: Callable[[], float] | None = None
    ) -> None:
        self.index_mode: IndexMode = index_mode
        self.clock = clock  # the router's clock: stamps load samples on receipt (see apply)
        self.confirm_grace_s = CONFIRM_GRACE_S
        self.replicas: dict[str, ReplicaState] = {}
        self._by_model: dict[str, list[ReplicaState]] = {}
        self.version = 0  # bumped on membership/health changes (policies may cache rings on it)

    # ---- membership -------------------------------------------------------------------------------
    def add_replica(
        self,
        replica_id: str,
        model: str,
        gpu_class: str,
        profile: GpuProfile,
        block_size: int = 16,
        kv_capacity_blocks: int | None = None,
        max_gpu_adapters: int = 4,
        address: str = "",
        max_cpu_adapters: int | None = None,
    ) -> ReplicaState:
        cap = kv_capacity_blocks or max(1, profile.kv_capacity_tokens // block_size)
        r = ReplicaState(
            replica_id=replica_id,
            model=model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            index=PrefixIndex(cap, prefix_closed=self.index_mode == "approximate"),
            address=address,
            max_gpu_adapters=max_gpu_adapters,
            max_cpu_adapters=max_cpu_adapters,
        )
        self.replicas[replica_id] = r
        self._reindex()
        return r

    def remove_replica(self, replica_id: str) -> ReplicaState | None:
        r = self.replicas.pop(replica_id, None)
        self._reindex()
        return r

    def set_healthy(self, replica_id: str, healthy: bool) -> None:
        r = self.replicas.get(replica_id)
        if r is not None and r.healthy != healthy:
            r.healthy = healthy
            self._reindex()

    def _reindex(self) -> None:
        by_model: dict[str, list[ReplicaState]] = {}
        for r in sorted(self.replicas.values(), key=lambda r: r.replica_id):
            if r.healthy:
                by_model.setdefault(r.model, []).append(r)
        self._by_model = by_model
        self.version += 1

    def candidates(self, model: str) -> list[ReplicaState]:
        """Healthy replicas serving ``model``, in a stable order (sorted by id)."""
        return self._by_model.get(model, [])

    def members(self, model: str) -> list[ReplicaState]:
        """All healthy replicas of ``model`` (what hash rings are built from); == candidates here."""
        return self._by_model.get(model, [])

    @property
    def base(self) -> FleetState:
        """The underlying fleet (a :class:`FleetView` returns the fleet it views)."""
        return self

    excluded: frozenset[str] = frozenset()
    """Replica ids hidden from ``candidates`` (always empty on the fleet itself; see FleetView)."""

    def models(self) -> list[str]:
        return sorted({r.model for r in self.replicas.values()})

    # ---- router-side accounting --------------------------------------------------------------------
    def on_dispatch(self, replica_id: str, req: RoutingRequest, cached_blocks: int | None = None) -> None:
        r = self.replicas[replica_id]
        if cached_blocks is None:
            cached_blocks = r.index.match(req.block_hashes)
        uncached = max(0, req.prompt_tokens - cached_blocks * r.block_size)
        r.in_flight[req.request_id] = InFlight(req.prompt_tokens, uncached, req.max_tokens, req.adapter)
        r.pending_prefill_tokens += uncached
        r.dispatched_total += 1
        if self.index_mode == "approximate":
            r.index.insert(req.block_hashes)
            if req.adapter is not None:
                # The engine will load the adapter to serve it; assume it becomes GPU-resident.
                r.adapters_gpu.add(req.adapter)
                r.adapters_cpu.discard(req.adapter)
        else:
            self._expect_blocks(r, req.block_hashes, cached_blocks)

    def _expect_blocks(self, r: ReplicaState, hashes: Sequence[int], cached_blocks: int) -> None:
        """Precise mode: the blocks just sent count as held until the engine's ``BlockStored`` confirms
        them or ``confirm_grace_s`` passes without it (then they are dropped again). Without this, every
        request in the few milliseconds before the engine's events arrive would see a cold replica."""
        r.index.touch(hashes[:cached_blocks])
        now = self.clock() if self.clock is not None else 0.0
        pending = r.unconfirmed
        self.expire_unconfirmed(r, now)
        new = [h for h in hashes[cached_blocks:] if h not in r.index or h in pending]
        if new:
            deadline = now + self.confirm_grace_s
            for h in new:
                pending.pop(h, None)
                pending[h] = deadline
            r.index.insert(new, evict=False)

    @staticmethod
    def expire_unconfirmed(r: ReplicaState, now: float) -> None:
        """Drop the blocks the engine has not confirmed within their grace (precise mode)."""
        pending = r.unconfirmed
        while pending:  # deadlines are in insertion order
            h, deadline = next(iter(pending.items()))
            if deadline > now:
                return
            del pending[h]
            r.index.remove((h,))

    def on_first_token(self, replica_id: str, request_id: str) -> None:
        r = self.replicas.get(replica_id)
        f = r.in_flight.get(request_id) if r else None
        if r is None or f is None or f.started:
            return
        f.started = True
        r.pending_prefill_tokens -= f.uncached_tokens
        r.decode_requests += 1

    def on_finish(self, replica_id: str, request_id: str) -> None:
        r = self.replicas.get(replica_id)
        if r is None:
            return
        f = r.in_flight.pop(request_id, None)
        if f is None:
            return
        if f.started:
            r.decode_requests -= 1
        else:
            r.pending_prefill_tokens -= f.uncached_tokens

    # ---- engine events ----------------------------------------------------------------------------
    def apply(self, ev: EngineEvent, now: float | None = None) -> None:
        """Apply one engine event received at ``now`` (the router's clock; default: ``clock()``).

        A load sample is stamped with its receipt time (``ReplicaState.sample_received_at``): its own
        ``time`` is the engine's clock, which no router clock can be compared with (another process or
        machine, another epoch). With neither ``now`` nor a clock, the sample's own time is used: only
        right when engines and router share one clock (the virtual-time simulator).
        """
        r = self.replicas.get(ev.replica_id)
        if r is None:
            return
        if isinstance(ev, LoadSample):
            if now is None:
                now = self.clock() if self.clock is not None else ev.time
            r.set_sample(ev, now)
        elif isinstance(ev, AdapterLoaded):
            if ev.tier == "gpu":
                r.adapters_gpu.add(ev.adapter)
                r.adapters_cpu.discard(ev.adapter)
            else:
                r.adapters_cpu.add(ev.adapter)
        elif isinstance(ev, AdapterUnloaded):
            if ev.tier == "gpu":
                r.adapters_gpu.discard(ev.adapter)
            else:
                r.adapters_cpu.discard(ev.adapter)
        elif self.index_mode == "precise":
            if isinstance(ev, (BlockStored, BlockRemoved)) and ev.medium == "cpu":
                if isinstance(ev, BlockStored):
                    r.cpu_blocks.update(ev.block_hashes)
                else:
                    r.cpu_blocks.difference_update(ev.block_hashes)
            elif isinstance(ev, BlockStored):
                r.index.insert(ev.block_hashes, evict=False)
                if r.unconfirmed:
                    for h in ev.block_hashes:
                        r.unconfirmed.pop(h, None)
            elif isinstance(ev, BlockRemoved):
                r.index.remove(ev.block_hashes)
                if r.unconfirmed:
                    for h in ev.block_hashes:
                        r.unconfirmed.pop(h, None)
            elif isinstance(ev, AllBlocksCleared):
                r.index.clear()
                r.unconfirmed.clear()


class FleetView:
    """A fleet with some replicas hidden from :meth:`candidates` (a retry's exclusions or replicas at
    their queue bound). Membership (:meth:`members`), ``version`` and ``base`` are the fleet's own, so
    policies keep their hash rings and only skip the hidden replicas; everything else delegates."""

    __slots__ = ("_fleet", "excluded")

    def __init__(self, fleet: FleetState, excluded: frozenset[str]) -> None:
        self._fleet = fleet
        self.excluded = excluded

    def candidates(self, model: str) -> list[ReplicaState]:
        ex = self.excluded
        return [r for r in self._fleet.candidates(model) if r.replica_id not in ex]

    def members(self, model: str) -> list[ReplicaState]:
        return self._fleet.members(model)

    @property
    def base(self) -> FleetState:
        return self._fleet

    def __getattr__(self, name: str) -> object:
        return getattr(self._fleet, name)
