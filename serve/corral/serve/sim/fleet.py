"""A fleet of sim engines behind one routing policy, in virtual time: the core of the fleet benchmark.

One discrete-event loop holds N :class:`~.engine.SimEngine` replicas (mixed GPU classes) and the shipped
router core (:class:`corral.router.core.RouterCore`, built from :func:`corral.router.settings.router_settings`
of a RoutingPolicy with the CRD's defaults, the workload's TTFT SLO and the strategy under test), driven by
a virtual clock:

- **arrival**: the request (already hashed) is routed with ``RouterCore.route`` (queue bound, policy) and
  accounted with ``RouterCore.dispatch``; the engine receives it (idle engines start a step at once; a
  macro decode step in flight is cut at the next step boundary). A request refused by the queue bound
  (``Saturated``) counts as rejected and as an SLO miss.
- **step end**: the engine applies the step; first tokens and finishes reach the router immediately
  (the router proxies the stream: ``first_token`` / ``finish``).
- **adapter paging**: when the workload names LoRA adapters, the router's adapter pager
  (:class:`corral.router.paging.AdapterPlanner`, configured from the RoutingPolicy's ``adapterPaging``
  defaults, as the router deployment runs it) plans every ``interval_s`` from the dispatches it saw; its
  loads and unloads go to the engines as ``LoadAdapter``/``UnloadAdapter`` would (a load is done, and
  charged, in the engine's next step).
- **engine events** (KV ``BlockStored``/``BlockRemoved``, adapter residency, ``LoadSample``) reach
  ``RouterCore.apply`` only after ``event_delay_s`` (real routers see them over a network and a publisher
  queue), and are stamped on receipt with the router's (virtual) clock, as in the service.

Latency metrics use the requests after the first ``warmup_fraction`` (cold caches excluded). A run can
stop early once more than ``stop_fraction`` of the measured requests are certain to miss the TTFT SLO
(their TTFT, or their wait so far, exceeds it): the P90 then exceeds the SLO whatever happens next.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from corral.api.profiles import GpuProfile, resolve_profile
from corral.api.routingpolicy import STRATEGIES, RoutingPolicySpec
from corral.router.core import RouterCore, Saturated
from corral.router.events import EngineEvent
from corral.router.paging import AdapterInfo, AdapterPlanner, PagingConfig
from corral.router.policies import BUILTIN_POLICIES
from corral.router.policy import PolicyRegistry
from corral.router.settings import RouterSettings, default_params, router_settings
from corral.router.types import RoutingRequest

from .engine import SimEngine, Step
from .virtual import submit
from .workloads import Workload

DEFAULT_REPLICAS = "H100:4,A100-80GB:4"
ALGORITHM_INDEX: dict[str, str] = {"approx_prefix": "approximate"}
"""Strategies whose published algorithm defines the index (SGLang's cache-aware router keeps its own
approximate tree); every other strategy runs with the RoutingPolicy's default ``prefixIndex``."""


def parse_replicas(spec: str) -> list[tuple[str, GpuProfile]]:
    """``"H100:4,A100-80GB:4"`` -> [("h100-0", H100), ..., ("a100-80gb-3", A100-80GB)]."""
    out: list[tuple[str, GpuProfile]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"bad replica spec {part!r}: expected GPU:COUNT, e.g. H100:4") from None
        if n < 1:
            raise ValueError(f"bad replica spec {part!r}: count must be >= 1")
        prof = resolve_profile(name)
        tag = prof.name.lower()
        base = sum(1 for rid, _ in out if rid.startswith(tag + "-"))
        out.extend((f"{tag}-{base + k}", prof) for k in range(n))
    if not out:
        raise ValueError(f"empty replica spec {spec!r}")
    return out


def parse_policy(spec: str) -> tuple[str, str]:
    """``"corral"`` -> ("corral", default mode); ``"corral@approximate"`` -> ("corral", "approximate").

    The default mode is the RoutingPolicy CRD's ``prefixIndex`` default (see :data:`ALGORITHM_INDEX`)."""
    name, _, mode = spec.partition("@")
    if not mode:
        mode = ALGORITHM_INDEX.get(name, RoutingPolicySpec.model_fields["prefix_index"].default)
    if mode not in ("precise", "approximate"):
        raise ValueError(f"bad index mode {mode!r} in {spec!r}: expected precise or approximate")
    return name, mode


def fleet_settings(policy: str, slo_s: float, policy_params: dict[str, Any] | None = None) -> RouterSettings:
    """The router settings a benchmark run uses: :func:`router_settings` of a RoutingPolicy with every
    field at the CRD default except ``strategy`` (for the CR strategies), ``ttftSloMs`` (the workload's SLO)
    and ``prefixIndex`` (see :func:`parse_policy`); ``policy_params`` (ablations) override params."""
    name, mode = parse_policy(policy)
    spec = RoutingPolicySpec.model_validate(
        {
            "poolRef": "bench",
            "strategy": name if name in STRATEGIES else "corral",
            "ttftSloMs": slo_s * 1000.0,
            "prefixIndex": mode,
        }
    )
    s = router_settings(spec)
    if name not in STRATEGIES:  # a policy outside the CRD's enum (lora_affinity, test policies)
        s = replace(s, strategy=name, policy_params=default_params(name, slo_s))
    if policy_params:
        s = replace(s, policy_params={**s.policy_params, **policy_params})
    return s


class VirtualClock:
    """The simulation's clock, read by the router core (``now`` is advanced by the event loop)."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FleetConfig:
    replicas: list[tuple[str, GpuProfile]] = field(default_factory=lambda: parse_replicas(DEFAULT_REPLICAS))
    model: str = "llm"
    max_loras: int = 8
    max_cpu_loras: int = 32
    event_delay_s: float = 0.05
    sample_interval_s: float = 0.1
    warmup_fraction: float = 0.1
    max_macro_steps: int = 4096
    cpu_kv_tokens: int = 0  # per replica: the CPU KV tier (corral.serve.sim.kv_offload); 0 = none
    paging: bool = True  # run the router's adapter pager (spec.adapterPaging) when the workload has adapters


@dataclass
class RunResult:
    """What one fleet run measured (latencies in seconds, over the measured requests)."""

    policy: str
    scale: float
    rate_rps: float
    requests: int
    measured: int
    completed: int
    saturated: bool
    ttft: np.ndarray
    tpot: np.ndarray
    prefix_hit_rate: float
    adapter_loads: int
    adapter_disk_loads: int
    busy_s: dict[str, float]
    preemptions: int
    sim_end_s: float
    wall_s: float
    decide_us_mean: float
    goodput_rps: float
    slo_attainment: float
    rejected: int = 0
    migrated: int = 0  # requests moved between router-held queues (holding policies, e.g. dualmap_paper)
    paged: int = 0  # load/unload actions the adapter pager issued over the whole run

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ttft, q)) if len(self.ttft) else math.nan

    @property
    def imbalance(self) -> float:
        vals = list(self.busy_s.values())
        mean = sum(vals) / max(1, len(vals))
        return max(vals) / mean if mean > 0 else 1.0

    @property
    def adapter_loads_per_1k(self) -> float:
        return 1000.0 * self.adapter_loads / max(1, self.measured)

    def summary(self) -> dict[str, Any]:
        return {
            "rate_rps": self.rate_rps,
            "scale": self.scale,
            "ttft_p50_s": self.pct(50),
            "ttft_p90_s": self.pct(90),
            "ttft_p99_s": self.pct(99),
            "tpot_p50_s": float(np.median(self.tpot)) if len(self.tpot) else math.nan,
            "prefix_hit_rate": self.prefix_hit_rate,
            "adapter_loads_per_1k": self.adapter_loads_per_1k,
            "imbalance": self.imbalance,
            "goodput_rps": self.goodput_rps,
            "slo_attainment": self.slo_attainment,
            "saturated": self.saturated,
            "preemptions": self.preemptions,
        }


_ARRIVE, _STEP, _DELIVER, _PAGE = 0, 1, 2, 3


def run_fleet(
    workload: Workload,
    policy: str,
    *,
    scale: float = 1.0,
    config: FleetConfig | None = None,
    policy_params: dict[str, Any] | None = None,
    stop_fraction: float | None = None,
    max_requests: int | None = None,
    policies: PolicyRegistry = BUILTIN_POLICIES,
) -> RunResult:
    """Replay ``workload`` (arrivals divided by ``scale``) through the fleet under ``policy``.

    ``policy`` is a strategy name, optionally ``name@precise`` / ``name@approximate`` for the router's
    index mode; the router runs with :func:`fleet_settings` (the shipped RoutingPolicy defaults)."""
    cfg = config or FleetConfig()
    settings = fleet_settings(policy, workload.slo_ttft_s, policy_params)
    clock = VirtualClock()
    router = RouterCore(settings, clock=clock, policies=policies)
    fleet = router.fleet
    reqs = workload.requests if max_requests is None else workload.requests[:max_requests]
    n = len(reqs)
    bs = workload.block_size
    slo = workload.slo_ttft_s
    n_warm = int(n * cfg.warmup_fraction)
    measured_n = n - n_warm

    engines: dict[str, SimEngine] = {}
    pending: list[EngineEvent] = []
    for rid, prof in cfg.replicas:
        engines[rid] = SimEngine(
            prof,
            rid,
            block_size=bs,
            max_loras=cfg.max_loras,
            max_cpu_loras=cfg.max_cpu_loras,
            on_event=pending.append,
            sample_interval_s=cfg.sample_interval_s,
            cpu_kv_tokens=cfg.cpu_kv_tokens,
        )
        fleet.add_replica(
            rid, cfg.model, prof.name, prof, block_size=bs, max_gpu_adapters=cfg.max_loras,
            max_cpu_adapters=cfg.max_cpu_loras,
        )  # fmt: skip

    adapters = sorted({r.adapter for r in reqs if r.adapter is not None})
    sizes = {r.adapter: r.adapter_mb for r in reqs if r.adapter is not None}
    pager = (
        AdapterPlanner(
            fleet,
            [AdapterInfo(a, cfg.model, f"sim://{a}") for a in adapters],
            PagingConfig.from_specs(settings.paging, settings.paging),
            clock,
        )
        if adapters and cfg.paging
        else None
    )
    paged = 0

    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    steps: dict[str, Step] = {}
    delay = cfg.event_delay_s
    max_steps = cfg.max_macro_steps
    apply = router.apply
    inv = 1.0 / scale
    arrivals = [r.arrival * inv for r in reqs]
    t_first = arrivals[0] if n else 0.0
    t_meas = arrivals[n_warm] if n_warm < n else math.inf
    order = {r.request_id: k for k, r in enumerate(reqs)}
    loads_at_warm: tuple[int, int] | None = None
    stop_n = math.inf if stop_fraction is None else math.floor(stop_fraction * measured_n) + 1
    bad = 0
    rejected = 0
    unstarted: OrderedDict[str, float] = OrderedDict()
    next_check = 0.0
    saturated = False
    decide_s = 0.0
    now = 0.0
    i = 0
    wall0 = time.perf_counter()

    def push(t: float, kind: int, obj: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, obj))

    def flush(t: float) -> None:
        if pending:
            push(t + delay, _DELIVER, pending.copy())
            pending.clear()

    def start(rid: str, t: float) -> None:
        planned = engines[rid].schedule_step(t, max_steps)
        if planned is not None:
            steps[rid] = planned
            push(planned.end, _STEP, (rid, planned))

    def wake(rid: str, t: float) -> None:
        """New work for ``rid`` at ``t``: start a step, or cut a macro step at its next step boundary."""
        st = steps.get(rid)
        if st is None:
            start(rid, t)
        elif st.n_steps > 1:
            old = st.end
            if engines[rid].truncate_step(st, t) != old:
                push(st.end, _STEP, (rid, st))

    def send(rid: str, rr: RoutingRequest, d: Any, r: Any, t: float) -> bool:
        """Dispatch to replica ``rid`` at ``t`` (False: larger than its whole KV cache, rejected)."""
        router.dispatch(rid, rr, d)
        if pager is not None:
            pager.on_dispatch(rr.adapter, t)
        eng = engines[rid]
        try:
            submit(eng, r, t)
        except ValueError:
            router.finish(rid, r.request_id)
            return False
        if rr.arrival < t:  # held at the router: that wait is part of its TTFT
            eng.seqs[r.request_id].arrival = rr.arrival
        wake(rid, t)
        flush(t)
        return True

    def page(t: float) -> None:
        """One round of the adapter pager, its actions executed as the engines' RPCs would."""
        nonlocal paged
        assert pager is not None
        for a in pager.plan(t):
            eng = engines[a.replica_id]
            paged += 1
            if a.kind == "unload":
                try:
                    eng.unload_adapter(a.adapter, "gpu")
                except RuntimeError:  # in use by the running batch: refused, as the engine's RPC is
                    continue
                pager.record_unloaded(a.replica_id, a.adapter, t)
            else:
                eng.load_adapter(a.adapter, a.tier, sizes.get(a.adapter))
                if a.tier == "gpu":
                    pager.record_loaded(a.replica_id, a.adapter, t)
                else:
                    pager.record_prefetched(a.replica_id, a.adapter, t)
                wake(a.replica_id, t)
        flush(t)

    if pager is not None and n:
        push(t_first, _PAGE, None)

    held: dict[str, Any] = {}  # request id -> workload request, while held at the router

    def release(t: float) -> None:
        nonlocal rejected, bad
        for h in router.release():
            r = held.pop(h.rr.request_id)
            if h.error is not None or not send(h.decision.replica_id, h.rr, h.decision, r, t):
                rejected += 1
                if unstarted.pop(r.request_id, None) is not None:
                    bad += 1

    while True:
        t_arr = arrivals[i] if i < n else math.inf
        if heap and heap[0][0] <= t_arr:
            now, _, kind, obj = heapq.heappop(heap)
            clock.now = now
            if kind == _STEP:
                rid, done_step = obj
                cur = steps.get(rid)
                if cur is None or cur is not done_step or cur.end != now:
                    continue  # superseded by a truncation
                del steps[rid]
                eng = engines[rid]
                for s, _gen, first, finished in eng.finish_step(cur):
                    rq = s.request_id
                    if first:
                        router.first_token(rid, rq)
                        if unstarted.pop(rq, None) is not None and now - s.arrival > slo:
                            bad += 1
                    if finished:
                        router.finish(rid, rq)
                flush(now)
                if eng.has_work():
                    start(rid, now)
                if held:
                    release(now)
            elif kind == _PAGE:
                assert pager is not None
                page(now)
                if i < n:  # until the last arrival (afterwards only the queued work drains)
                    push(now + pager.config.interval_s, _PAGE, None)
            else:
                for ev in obj:
                    apply(ev)
                if held:
                    release(now)
        elif i < n:
            now = clock.now = t_arr
            r = reqs[i]
            if i == n_warm:
                loads_at_warm = _loads(engines)
            rr = RoutingRequest(
                r.request_id,
                cfg.model,
                r.block_hashes,
                r.prompt_tokens,
                r.max_tokens,
                r.adapter,
                arrival=now,
                adapter_size_mb=r.adapter_mb,
            )
            t0 = time.perf_counter()
            i += 1
            try:
                d = router.route(rr)
            except Saturated:  # every replica at the queue bound: refused (429), counts as a miss
                decide_s += time.perf_counter() - t0
                rejected += 1
                if i > n_warm:
                    bad += 1
                continue
            decide_s += time.perf_counter() - t0
            if router.holds:  # router-side queues (e.g. dualmap_paper): released when a replica can take it
                router.hold(rr, d)
                held[r.request_id] = r
                if i > n_warm:
                    unstarted[r.request_id] = now
                release(now)
            elif not send(d.replica_id, rr, d, r, now):
                rejected += 1  # larger than that replica's whole KV cache: rejected (counts as a miss)
                if i > n_warm:
                    bad += 1
                continue
            elif i > n_warm:
                unstarted[r.request_id] = now
        else:
            break
        if stop_fraction is not None and now >= next_check:
            next_check = now + 0.5
            late = 0
            lim = now - slo
            for t_a in unstarted.values():
                if t_a >= lim or bad + late >= stop_n:
                    break
                late += 1
            if bad + late >= stop_n:
                saturated = True
                break

    if loads_at_warm is None:
        loads_at_warm = _loads(engines)
    loads_end = _loads(engines)
    records = [rec for e in engines.values() for rec in e.metrics.records if not rec.aborted]
    meas = [rec for rec in records if order[rec.request_id] >= n_warm]
    ttft = [rec.ttft for rec in meas if rec.ttft is not None]
    if saturated:  # censored: requests still waiting count with their wait so far (a lower bound)
        ttft.extend(now - t_a for t_a in unstarted.values())
    tpot = [x for x in (rec.tpot for rec in meas) if x is not None]
    hit = sum(rec.cached_tokens for rec in meas)
    ptok = sum(rec.prompt_tokens for rec in meas)
    span = (arrivals[-1] - t_meas) if n > n_warm + 1 else 1.0
    ttft_arr = np.asarray(ttft, dtype=float)
    attain = float((ttft_arr <= slo).sum()) / max(1, measured_n)
    return RunResult(
        policy=policy,
        scale=scale,
        rate_rps=n / max(1e-9, arrivals[-1] - t_first) if n > 1 else 0.0,
        requests=n,
        measured=measured_n,
        completed=len(meas),
        saturated=saturated,
        ttft=ttft_arr,
        tpot=np.asarray(tpot, dtype=float),
        prefix_hit_rate=hit / max(1, ptok),
        adapter_loads=(loads_end[0] - loads_at_warm[0]),
        adapter_disk_loads=(loads_end[1] - loads_at_warm[1]),
        paged=paged,
        busy_s={rid: e.metrics.busy_seconds for rid, e in engines.items()},
        preemptions=sum(e.metrics.num_preemptions_total for e in engines.values()),
        sim_end_s=now,
        wall_s=time.perf_counter() - wall0,
        decide_us_mean=1e6 * decide_s / max(1, i),
        goodput_rps=len(meas) / max(1e-9, span),
        slo_attainment=attain,
        rejected=rejected,
        migrated=router.held.migrated,
    )


def _loads(engines: dict[str, SimEngine]) -> tuple[int, int]:
    total = disk = 0
    for e in engines.values():
        total += e.lora.loads["disk"] + e.lora.loads["cpu"]
        disk += e.lora.loads["disk"]
    return total, disk


def describe_fleet(replicas: Sequence[tuple[str, GpuProfile]]) -> str:
    counts: dict[str, int] = {}
    for _, p in replicas:
        counts[p.name] = counts.get(p.name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def passes(r: RunResult, slo: float, quantile: float = 90.0) -> bool:
    """The SLO test of the goodput search: not cut short, nothing rejected, P90 TTFT <= SLO."""
    return not r.saturated and r.rejected == 0 and len(r.ttft) > 0 and r.pct(quantile) <= slo


@dataclass
class SearchResult:
    """Goodput search outcome: the highest passing rate, and every run made on the way (by rate)."""

    policy: str
    goodput_rps: float
    best: RunResult | None
    runs: list[RunResult]


def goodput_search(
    workload: Workload,
    policy: str,
    rates: Sequence[float],
    *,
    config: FleetConfig | None = None,
    policy_params: dict[str, Any] | None = None,
    bisect_steps: int = 3,
    extend: int = 3,
    quantile: float = 90.0,
    curve_stop_fraction: float = 0.5,
    on_run: Any = None,
) -> SearchResult:
    """Highest arrival rate (req/s, from the ``rates`` grid then bisection) with P90 TTFT <= the SLO.

    Grid points run in ascending order until the first failure (they make the TTFT-vs-rate curve; runs
    stop early only once half the requests missed the SLO). If every grid point passes the grid is
    extended by x1.5 steps, if none passes it is extended down by /2 steps; then the gap between the last
    pass and the first failure is bisected (geometric midpoints; probes stop as soon as > 10 % missed)."""
    slo = workload.slo_ttft_s
    base = workload.base_rate
    runs: list[RunResult] = []

    def run(rate: float, stop: float) -> RunResult:
        r = run_fleet(
            workload,
            policy,
            scale=rate / base,
            config=config,
            policy_params=policy_params,
            stop_fraction=stop,
        )
        runs.append(r)
        if on_run is not None:
            on_run(r)
        return r

    lo: RunResult | None = None
    hi_rate: float | None = None
    grid = sorted(rates)
    for rate in grid:
        r = run(rate, curve_stop_fraction)
        if passes(r, slo, quantile):
            lo = r
        else:
            hi_rate = rate
            break
    if hi_rate is None:
        rate = grid[-1]
        for _ in range(extend):
            rate *= 1.5
            r = run(rate, 0.1)
            if passes(r, slo, quantile):
                lo = r
            else:
                hi_rate = rate
                break
    if lo is None:
        rate = grid[0]
        for _ in range(extend):
            rate /= 2
            r = run(rate, 0.1)
            if passes(r, slo, quantile):
                lo = r
                break
            hi_rate = rate
    if lo is not None and hi_rate is not None:
        lo_rate = lo.scale * base
        for _ in range(bisect_steps):
            mid = math.sqrt(lo_rate * hi_rate)
            r = run(mid, 0.1)
            if passes(r, slo, quantile):
                lo, lo_rate = r, mid
            else:
                hi_rate = mid
    runs.sort(key=lambda r: r.scale)
    return SearchResult(policy, lo.goodput_rps if lo is not None else 0.0, lo, runs)
