"""Adapter paging manager: demand tracking, replica targets, slot-aware plans, in-flight safety, fetch."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from corral.router.paging import AdapterInfo, AdapterPager, DemandTracker, PagingConfig
from corral.serve.adapter_sources import AdapterNotFetchable, AdapterSourceError, fetch_adapter, parse_source


@dataclass
class _Flight:
    adapter: str | None


@dataclass
class _Replica:
    replica_id: str
    model: str = "m"
    healthy: bool = True
    adapters_gpu: set[str] = field(default_factory=set)
    adapters_cpu: set[str] = field(default_factory=set)
    max_gpu_adapters: int = 2
    max_cpu_adapters: int | None = None
    in_flight: dict[str, Any] = field(default_factory=dict)

    @property
    def outstanding(self) -> int:
        return len(self.in_flight)


class _Fleet:
    def __init__(self, *reps: _Replica) -> None:
        self.reps = {r.replica_id: r for r in reps}

    def candidates(self, model: str) -> list[_Replica]:
        return [r for _, r in sorted(self.reps.items()) if r.model == model and r.healthy]


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Control:
    """Applies actions to the fake fleet immediately, as engine events would."""

    def __init__(self, fleet: _Fleet) -> None:
        self.fleet = fleet
        self.calls: list[tuple[str, str, str, str]] = []

    async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: str) -> None:
        self.calls.append(("load", replica_id, adapter, tier))
        r = self.fleet.reps[replica_id]
        (r.adapters_gpu if tier == "gpu" else r.adapters_cpu).add(adapter)
        if tier == "gpu":
            r.adapters_cpu.discard(adapter)

    async def unload_adapter(self, replica_id: str, adapter: str) -> None:
        self.calls.append(("unload", replica_id, adapter, ""))
        self.fleet.reps[replica_id].adapters_gpu.discard(adapter)


def _adapters(*names: str) -> list[AdapterInfo]:
    return [AdapterInfo(n, "m", f"file:///x/{n}") for n in names]


def _pager(
    fleet: _Fleet, names: tuple[str, ...] = ("a", "b", "c"), **cfg: Any
) -> tuple[AdapterPager, _Clock]:
    clock = _Clock()
    cfg.setdefault("min_resident_s", 0.0)
    return AdapterPager(fleet, _Control(fleet), _adapters(*names), PagingConfig(**cfg), clock=clock), clock


def _drive(pager: AdapterPager, clock: _Clock, adapter: str, rps: float, seconds: float) -> None:
    n = int(rps * seconds)
    for _ in range(n):
        clock.t += 1.0 / rps
        pager.on_dispatch(adapter)


# ---- demand ----------------------------------------------------------------------------------------


def test_demand_ewma_converges_to_rate_and_decays_by_half_life() -> None:
    d = DemandTracker(half_life_s=5.0)
    t = 0.0
    for _ in range(2000):
        t += 0.1
        d.record("a", t)
    assert d.rate("a", t) == pytest.approx(10.0, rel=0.02)
    assert d.rate("a", t + 5.0) == pytest.approx(d.rate("a", t) / 2, rel=1e-6)
    assert d.rate("never", t) == 0.0


def test_target_scales_with_demand_and_is_capped() -> None:
    fleet = _Fleet(*(_Replica(f"r{i}") for i in range(4)))
    pager, clock = _pager(fleet, replication_rps=5.0, half_life_s=2.0)
    assert pager.target("a", 4, clock()) == 0
    _drive(pager, clock, "a", rps=12.0, seconds=30)
    assert pager.target("a", 4, clock()) == 3  # ceil(12 / 5)
    assert pager.target("a", 2, clock()) == 2  # capped by the replicas serving the model
    pager.config.max_replicas_per_adapter = 1
    assert pager.target("a", 4, clock()) == 1
    clock.t += 60
    assert pager.target("a", 4, clock()) == 0


# ---- planning --------------------------------------------------------------------------------------


async def test_hot_adapter_gets_replicated_and_cold_copies_are_left_to_the_engines() -> None:
    fleet = _Fleet(_Replica("r0"), _Replica("r1"), _Replica("r2"))
    pager, clock = _pager(fleet, replication_rps=2.0, half_life_s=2.0)
    _drive(pager, clock, "a", rps=5.0, seconds=20)
    await pager.step()
    holders = {r for r, rep in fleet.reps.items() if "a" in rep.adapters_gpu}
    assert len(holders) == 3  # ceil(5 / 2)
    assert pager.stats.loads == 3

    # Cold: its copies stay until a slot is wanted (the engine's LRU evicts it then, for free).
    clock.t += 60.0
    assert pager.target("a", 3, clock()) == 0
    await pager.step()
    assert all("a" in r.adapters_gpu for r in fleet.reps.values()) and pager.stats.unloads == 0


def test_a_single_copy_is_left_to_the_first_request() -> None:
    """Target 1 (demand under ``replication_rps``): no preload; the request that needs it loads it."""
    pager, clock = _pager(_Fleet(_Replica("r0"), _Replica("r1")), replication_rps=100.0)
    _drive(pager, clock, "a", rps=2, seconds=5)
    assert pager.target("a", 2, clock()) == 1
    assert pager.plan() == []


def test_never_unloads_with_requests_in_flight() -> None:
    # 'b' is hot (target 2); both replicas are full with colder 'a' and 'c'; on r0 both are in use.
    r0 = _Replica("r0", max_gpu_adapters=2, adapters_gpu={"a", "c"},
                  in_flight={"q1": _Flight("a"), "q2": _Flight("c")})  # fmt: skip
    r1 = _Replica("r1", max_gpu_adapters=2, adapters_gpu={"a", "c"})
    pager, clock = _pager(_Fleet(r0, r1), replication_rps=1.0, names=("a", "b", "c"))
    _drive(pager, clock, "b", rps=4.0, seconds=5)
    actions = pager.plan()
    assert not any(a.replica_id == "r0" for a in actions)  # nothing on r0 is evictable
    assert [(a.kind, a.replica_id) for a in actions] == [("unload", "r1"), ("load", "r1")]
    assert pager.stats.skipped_in_flight >= 1


def test_respects_gpu_slots_and_evicts_only_colder_idle_adapters() -> None:
    # r0 is full with b (busy) and c (idle, colder than a); a is hot enough for a second copy (r1 has one).
    r0 = _Replica("r0", max_gpu_adapters=2, adapters_gpu={"b", "c"}, in_flight={"x": _Flight("b")})
    r1 = _Replica("r1", max_gpu_adapters=2, adapters_gpu={"a"})
    pager, clock = _pager(_Fleet(r0, r1), replication_rps=2.0, half_life_s=5.0)
    pager.on_dispatch("c")
    _drive(pager, clock, "b", rps=1.0, seconds=10)
    _drive(pager, clock, "a", rps=4.0, seconds=10)
    actions = pager.plan()
    got = [(a.kind, a.replica_id, a.adapter) for a in actions]
    assert got == [("unload", "r0", "c"), ("load", "r0", "a")]

    # Nothing colder and idle to evict: no action, never over the slots.
    r0.adapters_gpu = {"b", "c"}
    r0.in_flight = {"x": _Flight("b"), "y": _Flight("c")}
    assert pager.plan() == []


def test_pinned_adapters_everywhere_and_never_unloaded() -> None:
    fleet = _Fleet(_Replica("r0"), _Replica("r1"))
    pager, clock = _pager(fleet, pin=("p",), names=("p", "a"))
    actions = pager.plan(clock())
    assert sorted((a.kind, a.replica_id, a.adapter) for a in actions) == [
        ("load", "r0", "p"),
        ("load", "r1", "p"),
    ]
    for r in fleet.reps.values():
        r.adapters_gpu = {"p", "a"}
    # Hot 'a' everywhere cannot evict pinned 'p' even with slots full.
    _drive(pager, clock, "a", rps=50, seconds=5)
    assert not any(a.kind == "unload" and a.adapter == "p" for a in pager.plan())


def test_prefers_cpu_resident_replica_and_prefetches_to_cpu() -> None:
    reps = [_Replica("r0"), _Replica("r1", adapters_cpu={"a"}), _Replica("r2"), _Replica("r3")]
    pager, clock = _pager(_Fleet(*reps), prefetch_to_cpu=True, replication_rps=1.0, cpu_slots=4)
    _drive(pager, clock, "a", rps=2, seconds=30)  # target 2
    actions = pager.plan()
    gpu_loads = [(a.replica_id, a.adapter) for a in actions if a.kind == "load" and a.tier == "gpu"]
    assert gpu_loads == [("r1", "a"), ("r0", "a")]  # the CPU-resident replica first
    cpu_loads = sorted((a.replica_id, a.adapter) for a in actions if a.tier == "cpu")
    assert cpu_loads == [("r2", "a"), ("r3", "a")]


def test_cpu_prefetch_respects_cpu_slots() -> None:
    r0 = _Replica("r0", max_gpu_adapters=1, adapters_cpu={"z"})
    pager, clock = _pager(_Fleet(r0), names=("a", "b", "z"), prefetch_to_cpu=True, cpu_slots=2)
    for n in ("a", "b"):
        _drive(pager, clock, n, rps=1, seconds=3)
    cpu = [a.adapter for a in pager.plan() if a.tier == "cpu"]
    assert len(cpu) == 1  # one free CPU slot


def test_cpu_prefetch_fills_only_free_host_slots_of_idle_replicas_once() -> None:
    """The host cache holds the GPU-active adapters too (vLLM's max_cpu_loras); a busy replica gets no
    prefetch (a disk read blocks its step loop); a prefetch is not planned again before its event."""
    names = ("a", "b", "c", "g")
    idle = _Replica("r0", adapters_gpu={"g"}, max_cpu_adapters=2)
    busy = _Replica("r1", max_cpu_adapters=8, in_flight={"q": _Flight(None)})
    unknown = _Replica("r2")  # its host cache size is unknown: no prefetch
    pager, clock = _pager(_Fleet(idle, busy, unknown), names=names, prefetch_to_cpu=True)
    for n in ("a", "b", "c"):
        _drive(pager, clock, n, rps=1, seconds=3)
    acts = [(a.replica_id, a.adapter) for a in pager.plan() if a.tier == "cpu"]
    assert len(acts) == 1 and acts[0][0] == "r0"  # 2 slots, one taken by the GPU-active 'g'
    pager.planner.record_prefetched(*acts[0])  # done; the engine's event has not arrived yet
    assert [a for a in pager.plan() if a.tier == "cpu"] == []


async def test_recent_own_loads_are_not_replanned_before_events_arrive() -> None:
    fleet = _Fleet(_Replica("r0"), _Replica("r1"))

    class _SilentControl(_Control):
        async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: str) -> None:
            self.calls.append(("load", replica_id, adapter, tier))  # no event yet

    clock = _Clock()
    control = _SilentControl(fleet)
    pager = AdapterPager(fleet, control, _adapters("a"), PagingConfig(replication_rps=1.0), clock=clock)
    _drive(pager, clock, "a", rps=2, seconds=30)  # target 2
    await pager.step()
    await pager.step()
    assert [c[0] for c in control.calls] == ["load", "load"]


async def test_failures_are_counted_and_loop_stops() -> None:
    fleet = _Fleet(_Replica("r0"))

    class _Broken(_Control):
        async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: str) -> None:
            raise RuntimeError("engine gone")

    clock = _Clock()
    cfg = PagingConfig(interval_s=0.01, pin=("a",))  # a pinned adapter is placed without demand
    pager = AdapterPager(fleet, _Broken(fleet), _adapters("a"), cfg, clock=clock)
    _drive(pager, clock, "a", rps=2, seconds=5)
    stop = asyncio.Event()
    task = asyncio.create_task(pager.run(stop))
    for _ in range(100):
        if pager.stats.failures:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert pager.stats.failures >= 1


def test_config_from_specs_reads_camel_or_snake_case() -> None:
    class P:
        pin = ["x"]
        prefetchToCpu = True
        replicationDemandRps = 3

    class C:
        cpu_slots = 7

    cfg = PagingConfig.from_specs(P(), C(), interval_s=1.0)
    assert cfg.pin == ("x",) and cfg.prefetch_to_cpu and cfg.replication_rps == 3.0
    assert cfg.cpu_slots == 7 and cfg.interval_s == 1.0
    assert math.isclose(PagingConfig.from_specs(None, None).replication_rps, 5.0)


# ---- sources ---------------------------------------------------------------------------------------


def _make_adapter(d: Path, rank: int = 8) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((rank, 64), np.float32),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, rank), np.float32),
        },
        str(d / "adapter_model.safetensors"),
    )
    (d / "adapter_config.json").write_text(f'{{"r": {rank}, "lora_alpha": 16}}')
    return d


def test_parse_source_schemes() -> None:
    assert parse_source("file:///a/b").location == "/a/b"
    s3 = parse_source("s3://bucket/loras/x")
    assert (s3.scheme, s3.location) == ("s3", "bucket/loras/x")
    hf = parse_source("hf://org/repo@v2")
    assert (hf.scheme, hf.location, hf.revision) == ("hf", "org/repo", "v2")
    for bad in ("", "/abs/path", "file://host/x", "s3://bucket", "hf://onlyorg", "gs://b/k", "file://rel"):
        with pytest.raises(AdapterSourceError):
            parse_source(bad)


def test_fetch_file_adapter_validates_copies_and_caches(tmp_path: Path) -> None:
    src = _make_adapter(tmp_path / "src" / "sql", rank=8)
    art = fetch_adapter("sql", src.as_uri(), tmp_path / "cache")
    assert art.rank == 8 and art.tensors == 2
    assert (art.path / "adapter_model.safetensors").is_file()
    assert (art.path / "adapter_config.json").is_file()
    again = fetch_adapter("sql", src.as_uri(), tmp_path / "cache")
    assert again.path == art.path

    single = fetch_adapter("one", (src / "adapter_model.safetensors").as_uri(), tmp_path / "cache")
    assert (single.path / "adapter_model.safetensors").is_file()


def test_fetch_rejects_bad_and_remote_sources(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFetchable, match="not fetchable here"):
        fetch_adapter("x", "s3://bucket/key", tmp_path)
    with pytest.raises(AdapterNotFetchable):
        fetch_adapter("x", "hf://org/repo", tmp_path)
    with pytest.raises(AdapterSourceError, match="does not exist"):
        fetch_adapter("x", (tmp_path / "missing").as_uri(), tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterSourceError, match="not a valid safetensors"):
        fetch_adapter("x", bad.as_uri(), tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterSourceError, match=r"no \.safetensors"):
        fetch_adapter("x", empty.as_uri(), tmp_path / "cache")


def test_external_demand_from_other_routers_counts() -> None:
    fleet = _Fleet(*(_Replica(f"r{i}") for i in range(4)))
    pager, clock = _pager(fleet, replication_rps=5.0, half_life_s=2.0)
    _drive(pager, clock, "a", rps=4.0, seconds=20)  # this router alone: 1 replica
    assert pager.target("a", 4, clock()) == 1
    pager.set_external_demand({"a": 8.0, "b": 0.0})  # the other router saw twice as much
    assert pager.target("a", 4, clock()) == 3  # ceil(12 / 5)
    assert pager.target("b", 4, clock()) == 0


# ---- the split: planning is pure, executing talks to the control, fetching is serve's ------------------


def test_planner_alone_plans_without_a_control_or_an_event_loop() -> None:
    from corral.router.paging import AdapterPlanner

    fleet = _Fleet(_Replica("r0"), _Replica("r1"))
    clock = _Clock()
    cfg = PagingConfig(min_resident_s=0.0, replication_rps=5.0)
    planner = AdapterPlanner(fleet, _adapters("a"), cfg, clock=clock)
    for _ in range(400):  # 20 req/s: target 2
        clock.t += 0.05
        planner.on_dispatch("a")
    acts = planner.plan()
    assert sorted((a.kind, a.replica_id, a.adapter, a.tier) for a in acts) == [
        ("load", "r0", "a", "gpu"),
        ("load", "r1", "a", "gpu"),
    ]
    for a in acts:
        planner.mark_pending(a.replica_id, "a")  # what the executor does while the load runs
    assert planner.plan() == []
    for a in acts:
        planner.clear_pending(a.replica_id, "a")
        planner.record_loaded(a.replica_id, "a")  # before the engine's event shows it
    assert planner.plan() == []


def test_paging_modules_keep_their_side_of_the_split() -> None:
    """planning.py imports no event loop, no executor and no file access; fetching lives in serve."""
    import ast

    import corral.router.paging as pkg
    from corral.router.paging import planning

    tree = ast.parse(Path(planning.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    for forbidden in ("asyncio", "executing", "shutil", "hashlib", "safetensors", "urllib.parse"):
        assert forbidden not in imported, forbidden
    assert not hasattr(pkg, "fetch_adapter") and not hasattr(pkg, "parse_source")
