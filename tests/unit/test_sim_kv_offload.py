"""The CPU KV tier: the sim engine's host-memory LRU, its KV events, and how the cost model prices it."""

from __future__ import annotations

import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.events import BlockRemoved, BlockStored
from corral.router.policies._common import estimate_ttft
from corral.router.state import FleetState
from corral.serve.sim import SimEngine, simulate
from corral.serve.sim.kv_offload import CpuKvTier
from router_testkit import fleet, prompt, req
from sim_testkit import Req, hashes


def test_tier_is_an_lru_with_net_events() -> None:
    t = CpuKvTier(3)
    t.store([1, 2, 3])
    t.store([1])  # refreshed: 2 is now the least recent
    t.store([4])
    assert 2 not in t and all(h in t for h in (1, 3, 4))
    assert t.drain() == ([1, 3, 4], [])  # 2 was stored and evicted in between: in neither list
    t.store([5])
    assert t.drain() == ([5], [3])
    assert t.match_from([9, 1, 4, 7, 5], 1, 5) == 2  # from index 1: 1, 4, then 7 is missing
    with pytest.raises(ValueError, match="capacity_blocks"):
        CpuKvTier(0)


def test_engine_reloads_evicted_prefix_from_the_tier_faster_than_recompute() -> None:
    prof = BUILTIN_PROFILES["H100"]
    events: list[object] = []
    kw = {"block_size": 16, "kv_capacity_tokens": 64 * 16, "on_event": events.append}
    eng = SimEngine(prof, cpu_kv_tokens=256 * 16, **kw)
    plain = SimEngine(prof, **kw)
    ha, hb = hashes(1, 40), hashes(2, 60)
    n_a = 40 * 16 + 5
    for e in (eng, plain):
        simulate(e, [Req("a", 0.0, n_a, 1, ha), Req("b", 1.0, 60 * 16, 1, hb)])  # b evicts most of a
        assert not all(h in e.pool.cached for h in ha)
    again = [Req("a2", 2.0, n_a, 1, ha)]
    warm = next(r for r in simulate(eng, again) if r.request_id == "a2")
    cold = next(r for r in simulate(plain, list(again)) if r.request_id == "a2")
    assert warm.cached_tokens == 40 * 16 and eng.metrics.cpu_kv_hits > 0
    assert cold.cached_tokens < 40 * 16 and plain.metrics.cpu_kv_hits == 0
    assert warm.ttft is not None and cold.ttft is not None and warm.ttft < cold.ttft
    loaded = eng.metrics.cpu_kv_hits
    assert warm.ttft >= prof.kv_load_s(loaded)  # the copy is paid, just cheaper than recomputing
    cpu_ev = [ev for ev in events if isinstance(ev, (BlockStored, BlockRemoved)) and ev.medium == "cpu"]
    assert cpu_ev and all(isinstance(ev, BlockStored) for ev in cpu_ev)  # 256 blocks: nothing evicted
    f = FleetState("precise")
    f.add_replica("sim-0", "m", "H100", prof, block_size=16)
    for ev in events:
        if getattr(ev, "replica_id", None) == "sim-0":
            f.apply(ev, now=0.0)  # type: ignore[arg-type]
    assert set(ha) <= f.replicas["sim-0"].cpu_blocks  # the router learns the tier from the events


def test_cost_model_prices_a_cpu_hit_between_a_gpu_hit_and_a_miss() -> None:
    q = req("q", prompt(3, 8000))
    f = fleet(3, mode="precise")
    f.apply(BlockStored("r000", tuple(q.block_hashes)))  # GPU hit
    f.apply(BlockStored("r001", tuple(q.block_hashes), medium="cpu"))  # CPU-tier hit
    est = {
        rid: estimate_ttft(r, q, 0.0, max_age=5.0, chunk_tokens=0, adapter_mb=85.0)
        for rid, r in f.replicas.items()
    }
    assert est["r001"].cpu_blocks == len(q.block_hashes) and est["r001"].cached_blocks == 0
    assert est["r000"].total_s < est["r001"].total_s < est["r002"].total_s
    f.apply(BlockRemoved("r001", tuple(q.block_hashes), medium="cpu"))
    assert not f.replicas["r001"].cpu_blocks and f.replicas["r000"].index.match(q.block_hashes) > 0
