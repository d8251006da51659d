"""Adapter paging, planning half: from per-adapter demand to the load/unload actions that keep LoRA
adapters where the requests for them are. Pure and deterministic given the fleet view and a clock.

- :class:`DemandTracker`: per-adapter demand as an exponentially weighted request rate, fed by the
  router's dispatches (plus what the other routers of the pool report, active-active);
- :meth:`AdapterPlanner.target`: demand -> *replica target*, ``ceil(rps / replication_rps)``, at least one
  while the adapter is warm, capped by ``max_replicas_per_adapter`` and by the replicas serving its base
  model; pinned adapters are wanted on every replica of their base model and are never unloaded;
- :meth:`AdapterPlanner.plan`: GPU loads that *replicate* an adapter whose target is two or more (or place a
  pinned one), against each replica's GPU slots, evicting only adapters colder than the one coming in,
  not pinned, and **never one with requests in flight** on that replica; optionally CPU-tier prefetches of
  warm adapters into free host-memory slots of replicas with nothing in flight.

What it leaves to the engines, measured in the fleet benchmark (``corral.serve.sim.fleet`` runs this
planner): a single copy is loaded by the first request that needs it (a preload would stall a batch for
the same load, and evict another adapter); a cold adapter is not unloaded until its slot is wanted (the
engine's LRU evicts it then, for free; an early unload only turns its next request's hit into a load);
a prefetch runs only on an idle replica (loading weights from disk blocks the engine's step loop, so a
prefetch into a busy replica stalls every running request) and only into free slots of its host cache,
which holds the GPU-active adapters too (vLLM's ``max_cpu_loras``): a prefetch past it evicts another
adapter there, which the next round would prefetch back.

The planner remembers what the executor (:mod:`corral.router.paging.executing`) did recently
(:meth:`~AdapterPlanner.record_loaded` ...) so a round's actions are not planned again before the engines'
own adapter events show them. No I/O, no Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Tier = Literal["gpu", "cpu"]


class DemandTracker:
    """Per-adapter request rate as an exponentially decaying count (rate = count / tau).

    Each dispatch adds ``1 / tau``; the value decays as ``exp(-dt / tau)``, so a steady stream of ``r``
    requests per second converges to ``r``. ``tau`` is ``half_life_s / ln 2``.
    """

    def __init__(self, half_life_s: float = 10.0) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        self.tau = half_life_s / math.log(2)
        self._v: dict[str, tuple[float, float]] = {}
        self.last_seen: dict[str, float] = {}

    def record(self, adapter: str, now: float, n: int = 1) -> None:
        v, t = self._v.get(adapter, (0.0, now))
        self._v[adapter] = (v * math.exp(-max(0.0, now - t) / self.tau) + n / self.tau, now)
        self.last_seen[adapter] = now

    def rate(self, adapter: str, now: float) -> float:
        v, t = self._v.get(adapter, (0.0, now))
        return v * math.exp(-max(0.0, now - t) / self.tau)

    def rates(self, now: float) -> dict[str, float]:
        return {a: self.rate(a, now) for a in self._v}


class _InFlightView(Protocol):
    adapter: str | None


class ReplicaView(Protocol):
    """The parts of :class:`~corral.router.state.ReplicaState` the pager reads."""

    replica_id: str
    model: str
    healthy: bool
    adapters_gpu: set[str]
    adapters_cpu: set[str]
    max_gpu_adapters: int
    max_cpu_adapters: int | None
    in_flight: Mapping[str, Any]

    @property
    def outstanding(self) -> int: ...


class FleetView(Protocol):
    def candidates(self, model: str) -> Sequence[Any]: ...


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    base_model: str
    source: str


@dataclass(slots=True)
class PagingConfig:
    """Knobs (RoutingPolicy ``spec.adapterPaging`` plus ModelPool ``spec.adapterCache``)."""

    pin: tuple[str, ...] = ()
    prefetch_to_cpu: bool = False
    replication_rps: float = 5.0  # one more replica per this much demand
    max_replicas_per_adapter: int | None = None
    min_demand_rps: float = 0.02  # below this, a non-pinned adapter is cold (target 0)
    half_life_s: float = 10.0
    min_resident_s: float = 5.0  # do not unload an adapter the pager loaded less than this ago
    cpu_slots: int | None = None  # per replica; None = the engine's own limit decides
    interval_s: float = 0.5
    event_grace_s: float = 3.0  # trust our own load/unload this long before the engine's event shows it

    @classmethod
    def from_specs(cls, paging: Any = None, cache: Any = None, **overrides: Any) -> PagingConfig:
        """Build from the API models' ``adapterPaging`` / ``adapterCache`` objects (attribute access,
        snake_case or camelCase), ignoring what they do not have."""

        def get(obj: Any, *names: str) -> Any:
            for n in names:
                if obj is not None and getattr(obj, n, None) is not None:
                    return getattr(obj, n)
            return None

        kw: dict[str, Any] = {}
        if (v := get(paging, "pin", "pinned")) is not None:
            kw["pin"] = tuple(v)
        if (v := get(paging, "prefetch_to_cpu", "prefetchToCpu")) is not None:
            kw["prefetch_to_cpu"] = bool(v)
        v = get(paging, "replication_demand_rps", "replicationDemandRps", "replication_threshold_rps")
        if v is not None:
            kw["replication_rps"] = float(v)
        if (v := get(paging, "max_replicas_per_adapter", "maxReplicasPerAdapter")) is not None:
            kw["max_replicas_per_adapter"] = int(v)
        if (v := get(cache, "cpu_slots", "cpuSlots")) is not None:
            kw["cpu_slots"] = int(v)
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["load", "unload"]
    replica_id: str
    adapter: str
    tier: Tier = "gpu"
    reason: str = ""


@dataclass(slots=True)
class PagerStats:
    loads: int = 0
    unloads: int = 0
    prefetches: int = 0
    failures: int = 0
    skipped_in_flight: int = 0
    last_targets: dict[str, int] = field(default_factory=dict)


def _busy(replica: Any, adapter: str) -> bool:
    return any(getattr(f, "adapter", None) == adapter for f in replica.in_flight.values())


# ---- the planner --------------------------------------------------------------------------------------


class AdapterPlanner:
    """Plans adapter placement from demand (pure: reads the fleet view, returns actions)."""

    def __init__(
        self,
        fleet: FleetView,
        adapters: Iterable[AdapterInfo],
        config: PagingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = fleet
        self.config = config or PagingConfig()
        self.clock = clock
        self.adapters: dict[str, AdapterInfo] = {a.name: a for a in adapters}
        self.demand = DemandTracker(self.config.half_life_s)
        self.external: dict[str, float] = {}  # demand other routers saw (active-active), req/s
        self.stats = PagerStats()
        self._loaded_at: dict[tuple[str, str], float] = {}
        self._unloaded_at: dict[tuple[str, str], float] = {}
        self._prefetched_at: dict[tuple[str, str], float] = {}
        self._pending: set[tuple[str, str]] = set()

    # -- inputs --
    def on_dispatch(self, adapter: str | None, now: float | None = None) -> None:
        """Record one request for ``adapter`` (call from the router's dispatch path; cheap)."""
        if adapter is not None and adapter in self.adapters:
            self.demand.record(adapter, self.clock() if now is None else now)

    def update(
        self, adapters: Iterable[AdapterInfo] | None = None, config: PagingConfig | None = None
    ) -> None:
        """Apply a changed ModelPool adapter list or RoutingPolicy paging section (keeps demand)."""
        if adapters is not None:
            self.adapters = {a.name: a for a in adapters}
        if config is not None:
            half_life_changed = config.half_life_s != self.config.half_life_s
            self.config = config
            if half_life_changed:
                self.demand = DemandTracker(config.half_life_s)

    def set_external_demand(self, rates: Mapping[str, float]) -> None:
        """Demand seen by the other routers of the pool (each router dispatches only its own share)."""
        self.external = {a: float(r) for a, r in rates.items() if r > 0}

    def rate(self, adapter: str, now: float) -> float:
        """Pool-wide demand estimate: this router's EWMA plus what the other routers reported."""
        return self.demand.rate(adapter, now) + self.external.get(adapter, 0.0)

    # -- what the executor did (until the engines' events show it) --
    def is_pending(self, replica_id: str, adapter: str) -> bool:
        return (replica_id, adapter) in self._pending

    def mark_pending(self, replica_id: str, adapter: str) -> None:
        """A load of ``adapter`` on ``replica_id`` is under way: count it as a holder, do not plan it."""
        self._pending.add((replica_id, adapter))

    def clear_pending(self, replica_id: str, adapter: str) -> None:
        self._pending.discard((replica_id, adapter))

    def record_loaded(self, replica_id: str, adapter: str, now: float | None = None) -> None:
        """A GPU load finished: it is resident (and not removable for ``min_resident_s``)."""
        key = (replica_id, adapter)
        self._loaded_at[key] = self.clock() if now is None else now
        self._unloaded_at.pop(key, None)

    def record_prefetched(self, replica_id: str, adapter: str, now: float | None = None) -> None:
        """A CPU-tier prefetch finished: count it as host-resident until the engine's event shows it."""
        self._prefetched_at[(replica_id, adapter)] = self.clock() if now is None else now

    def record_unloaded(self, replica_id: str, adapter: str, now: float | None = None) -> None:
        key = (replica_id, adapter)
        self._loaded_at.pop(key, None)
        self._unloaded_at[key] = self.clock() if now is None else now

    # -- planning --
    def target(self, adapter: str, n_candidates: int, now: float) -> int:
        """How many replicas should hold ``adapter`` on GPU."""
        cfg = self.config
        if adapter in cfg.pin:
            return n_candidates
        rps = self.rate(adapter, now)
        if rps < cfg.min_demand_rps:
            return 0
        want = max(1, math.ceil(rps / max(cfg.replication_rps, 1e-9)))
        if cfg.max_replicas_per_adapter is not None:
            want = min(want, cfg.max_replicas_per_adapter)
        return min(want, n_candidates)

    def _priority(self, adapter: str, now: float) -> float:
        return math.inf if adapter in self.config.pin else self.rate(adapter, now)

    def _expected_gpu(self, r: Any, now: float) -> set[str]:
        """GPU residency as reported, corrected for our own recent actions whose engine events may
        not have arrived yet (so one round's loads are not planned again by the next)."""
        held = set(r.adapters_gpu)
        grace = self.config.event_grace_s
        for (rid, name), t in self._loaded_at.items():
            if rid == r.replica_id and now - t < grace:
                held.add(name)
        for (rid, name), t in self._unloaded_at.items():
            if rid == r.replica_id and now - t < grace:
                held.discard(name)
        return held

    def plan(self, now: float | None = None) -> list[Action]:
        """The load/unload actions that move the fleet toward the targets (pure; reads the fleet view)."""
        now = self.clock() if now is None else now
        actions: list[Action] = []
        by_model: dict[str, list[AdapterInfo]] = {}
        for a in self.adapters.values():
            by_model.setdefault(a.base_model, []).append(a)

        targets: dict[str, int] = {}
        for model, infos in sorted(by_model.items()):
            self._plan_model(model, infos, now, targets, actions)
        self.stats.last_targets = targets
        return actions

    def _plan_model(
        self, model: str, infos: list[AdapterInfo], now: float, targets: dict[str, int], actions: list[Action]
    ) -> None:
        cfg = self.config
        reps = [r for r in self.fleet.candidates(model) if getattr(r, "healthy", True)]
        if not reps:
            return
        # Simulated residency after the actions planned so far.
        gpu = {r.replica_id: self._expected_gpu(r, now) for r in reps}
        cpu = {r.replica_id: set(r.adapters_cpu) for r in reps}
        grace = cfg.event_grace_s
        for (rid, name), t in list(self._prefetched_at.items()):
            if now - t >= grace:
                del self._prefetched_at[(rid, name)]
            elif rid in cpu:
                cpu[rid].add(name)
        by_id = {r.replica_id: r for r in reps}
        names = {a.name for a in infos}
        # Hottest first, so a colder adapter never takes a slot a hotter one needs.
        order = sorted(names, key=lambda n: (-self._priority(n, now), n))
        for name in order:
            targets[name] = self.target(name, len(reps), now)

        def removable(rid: str, victim: str, incoming_prio: float) -> bool:
            if victim in cfg.pin:
                return False
            if _busy(by_id[rid], victim):
                self.stats.skipped_in_flight += 1
                return False
            if now - self._loaded_at.get((rid, victim), -math.inf) < cfg.min_resident_s:
                return False
            holders = sum(victim in g for g in gpu.values())
            surplus = holders > targets.get(victim, 0)
            return surplus or self._priority(victim, now) < incoming_prio

        for name in order:
            want = targets[name]
            holders = [rid for rid in sorted(gpu) if name in gpu[rid]]
            prio = self._priority(name, now)
            if len(holders) < want and (want > 1 or name in cfg.pin):
                # Prefer replicas holding it on CPU (cheap promotion), then free slots, then least load.
                def rank(rid: str, name: str = name) -> tuple[int, int, int, str]:
                    free = by_id[rid].max_gpu_adapters - len(gpu[rid])
                    return (0 if name in cpu[rid] else 1, 0 if free > 0 else 1, by_id[rid].outstanding, rid)

                for rid in sorted((r for r in gpu if name not in gpu[r]), key=rank):
                    if len(holders) >= want:
                        break
                    if (rid, name) in self._pending:
                        holders.append(rid)
                        continue
                    if len(gpu[rid]) >= by_id[rid].max_gpu_adapters:
                        victims = sorted(
                            (v for v in gpu[rid] if v != name and removable(rid, v, prio)),
                            key=lambda v: (self._priority(v, now), v),
                        )
                        if not victims:
                            continue
                        v = victims[0]
                        actions.append(Action("unload", rid, v, "gpu", f"make room for {name}"))
                        gpu[rid].discard(v)
                    actions.append(Action("load", rid, name, "gpu", f"target {want}"))
                    gpu[rid].add(name)
                    cpu[rid].discard(name)
                    holders.append(rid)
        if cfg.prefetch_to_cpu:
            warm = [n for n in order if targets[n] > 0 or self.rate(n, now) > 0]
            for rid in sorted(gpu):
                # only into free host-memory slots: a prefetch past the engine's own limit would evict
                # another adapter there (LRU), and the next round would prefetch that one back (thrash);
                # a replica whose limit is unknown gets no prefetches
                own, cap = by_id[rid].max_cpu_adapters, cfg.cpu_slots
                limit = own if cap is None else cap if own is None else min(own, cap)
                if limit is None or by_id[rid].outstanding > 0:
                    continue
                for name in warm:
                    if name in gpu[rid] or name in cpu[rid] or (rid, name) in self._pending:
                        continue
                    if len(cpu[rid] | gpu[rid]) >= limit:  # the host cache holds the GPU-active ones too
                        break
                    actions.append(Action("load", rid, name, "cpu", "prefetch"))
                    cpu[rid].add(name)
