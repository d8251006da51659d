"""Fidelity tests of the simulated engine: the basic laws a vLLM replica obeys, in virtual time."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.events import AdapterLoaded, BlockRemoved, BlockStored, LoadSample
from corral.router.state import FleetState
from corral.serve.sim import SimEngine, simulate
from sim_testkit import Req, hashes


def ttft_alone(engine: SimEngine, req: Req) -> float:
    recs = simulate(engine, [req])
    rec = next(r for r in recs if r.request_id == req.request_id)
    assert rec.ttft is not None
    return rec.ttft


@pytest.mark.parametrize("gpu", ["H100", "A100-80GB", "L4"])
def test_ttft_linear_in_uncached_prefill_with_slope_b1(gpu: str) -> None:
    prof = BUILTIN_PROFILES[gpu]
    lengths = np.arange(256, 8193, 512)  # within one chunk of max_num_batched_tokens
    ttfts = [
        ttft_alone(SimEngine(gpu, kv_capacity_tokens=64_000), Req(f"q{n}", 0.0, int(n), 4)) for n in lengths
    ]
    slope, intercept = np.polyfit(lengths, ttfts, 1)
    assert slope == pytest.approx(prof.b1_us * 1e-6, rel=0.01)
    assert intercept == pytest.approx(prof.b0_us * 1e-6, rel=0.02)
    resid = np.asarray(ttfts) - (slope * lengths + intercept)
    assert np.abs(resid).max() < 1e-6  # linear, not just correlated


def test_chunked_prefill_splits_long_prompts_into_budget_sized_steps() -> None:
    prof = BUILTIN_PROFILES["H100"]
    eng = SimEngine(prof, kv_capacity_tokens=64_000)
    n = 20_000
    t = ttft_alone(eng, Req("long", 0.0, n, 2))
    chunks = -(-n // prof.max_num_batched_tokens)
    assert chunks == 3
    assert t == pytest.approx((chunks * prof.b0_us + n * prof.b1_us) * 1e-6, rel=1e-9)


def test_full_prefix_hit_skips_prefill() -> None:
    prof = BUILTIN_PROFILES["H100"]
    eng = SimEngine(prof, block_size=16)
    hs = hashes(1, 256)
    cold = ttft_alone(eng, Req("a", 0.0, 4096, 4, hs))
    warm_req = Req("b", 10.0, 4096, 4, hs)
    recs = simulate(eng, [warm_req])
    warm = next(r for r in recs if r.request_id == "b")
    # vLLM always computes at least one token: the last (full) block is recomputed.
    assert warm.cached_tokens == 4096 - 16
    assert warm.ttft == pytest.approx(prof.step_s(16, 0), rel=1e-9)
    assert cold == pytest.approx(prof.step_s(4096, 0), rel=1e-9)
    stats = eng.stats()
    assert stats["vllm:prefix_cache_hits"] == 4080
    assert stats["vllm:prefix_cache_queries"] == 2 * 4096


def test_lru_eviction_under_pressure_keeps_recent_prefix() -> None:
    events: list[object] = []
    eng = SimEngine("H100", block_size=16, kv_capacity_tokens=64 * 16, on_event=events.append)
    ha, hb, hc = hashes(1, 20), hashes(2, 20), hashes(3, 40)
    # prompts end mid-block so a repeat hits all 20 full blocks (a block-aligned prompt recomputes its last)
    simulate(eng, [Req("a", 0.0, 20 * 16 + 5, 1, ha), Req("b", 1.0, 20 * 16 + 5, 1, hb)])
    simulate(eng, [Req("a2", 2.0, 20 * 16 + 5, 1, ha)])  # A used again: now more recent than B
    assert all(h in eng.pool.cached for h in ha + hb)
    simulate(eng, [Req("c", 3.0, 40 * 16, 1, hc)])  # needs 40 of 64 blocks: 22 free + 18 evicted
    removed = [h for ev in events if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
    assert removed and set(removed) <= set(hb)  # only the long-unused prefix lost blocks
    assert all(h in eng.pool.cached for h in ha)  # the recently used prefix survives
    # tails go first: what is left of B is a leading run of its chain
    left = [h in eng.pool.cached for h in hb]
    assert left == sorted(left, reverse=True)
    assert eng.pool.num_free == 64 and eng.pool.usage == 0.0


def test_preemption_when_out_of_blocks_then_everything_finishes() -> None:
    eng = SimEngine("H100", block_size=16, kv_capacity_tokens=200 * 16)
    reqs = [Req(f"q{i}", 0.0, 512, 1200) for i in range(6)]  # 6 x 108 blocks > 200 at full length
    recs = simulate(eng, reqs)
    assert len(recs) == 6 and all(r.output_tokens == 1200 for r in recs)
    assert eng.metrics.num_preemptions_total > 0
    assert sum(r.preemptions for r in recs) == eng.metrics.num_preemptions_total
    assert eng.pool.usage == 0.0


def test_adapter_miss_adds_its_load_time_by_tier() -> None:
    prof = BUILTIN_PROFILES["H100"]
    eng = SimEngine(prof, max_loras=2, max_cpu_loras=4)
    base = prof.step_s(1000, 0)
    disk = ttft_alone(eng, Req("d", 0.0, 1000, 2, adapter="x", adapter_mb=85.0))
    assert disk == pytest.approx(base + prof.adapter_load_s(85.0, "disk"), rel=1e-9)
    resident = ttft_alone(eng, Req("g", 5.0, 1000, 2, adapter="x", adapter_mb=85.0))
    assert resident == pytest.approx(base, rel=1e-9)
    assert eng.unload_adapter("x", "gpu") == "cpu"
    cpu = ttft_alone(eng, Req("c", 10.0, 1000, 2, adapter="x", adapter_mb=85.0))
    assert cpu == pytest.approx(base + prof.adapter_load_s(85.0, "cpu"), rel=1e-9)
    assert prof.adapter_load_s(85.0, "disk") > 10 * prof.adapter_load_s(85.0, "cpu")
    assert eng.stats()["sim:adapter_loads"] == {"disk": 1, "cpu": 1}


def test_batch_only_mixes_resident_adapters_up_to_max_loras() -> None:
    events: list[object] = []
    eng = SimEngine("H100", max_loras=2, max_cpu_loras=3, on_event=events.append)
    for i in range(12):
        eng.add_request(f"q{i}", 300, 20, adapter=f"a{i % 4}", now=0.0)
    now = 0.0
    seen: set[str] = set()
    while eng.has_work():
        st = eng.schedule_step(now)
        assert st is not None
        in_batch = {s.adapter for s, _ in st.scheduled if s.adapter}
        assert len(in_batch) <= 2
        assert in_batch <= set(eng.lora.gpu)  # every adapter in the batch is GPU-resident
        assert len(eng.lora.gpu) <= 2 and len(eng.lora.cpu) <= 3
        seen |= in_batch
        eng.finish_step(st)
        now = st.end
    assert seen == {"a0", "a1", "a2", "a3"}
    assert len(eng.metrics.records) == 12
    loaded = [ev for ev in events if isinstance(ev, AdapterLoaded) and ev.tier == "gpu"]
    assert len(loaded) >= 4


def test_littles_law_on_a_steady_run() -> None:
    rng = random.Random(7)
    lam = 6.0
    reqs, t = [], 0.0
    for i in range(3000):
        t += rng.expovariate(lam)
        reqs.append(Req(f"q{i}", t, rng.randint(200, 3000), rng.randint(20, 300), hashes(i, 4)))
    samples: list[LoadSample] = []
    eng = SimEngine(
        "A100-80GB",
        on_event=lambda ev: samples.append(ev) if isinstance(ev, LoadSample) else None,
        sample_interval_s=0.05,
    )
    recs = simulate(eng, reqs)
    horizon = max(r.finish for r in recs)
    w = statistics.mean(r.finish - r.arrival for r in recs)
    lam_hat = len(recs) / horizon
    # L from the engine's own gauges (running + waiting), time-weighted between samples
    ts = np.array([s.time for s in samples] + [horizon])
    ns = np.array([s.running + s.waiting for s in samples])
    l_gauges = float((ns * np.diff(ts)).sum() / horizon)
    l_area = eng.metrics.in_system_area / horizon
    assert l_area == pytest.approx(lam_hat * w, rel=1e-6)
    assert l_gauges == pytest.approx(lam_hat * w, rel=0.1)


def test_macro_decode_steps_give_the_same_timeline_as_single_steps() -> None:
    rng = random.Random(3)
    reqs, t = [], 0.0
    for i in range(400):
        t += rng.expovariate(4.0)
        reqs.append(Req(f"q{i}", t, rng.randint(100, 2000), rng.randint(5, 400), hashes(i % 37, 3)))
    a = {r.request_id: r for r in simulate(SimEngine("H100"), reqs, max_steps=1)}
    b = {r.request_id: r for r in simulate(SimEngine("H100"), reqs, max_steps=4096)}
    assert a.keys() == b.keys()
    for k, ra in a.items():
        rb = b[k]
        assert rb.first_token == pytest.approx(ra.first_token, abs=1e-6)
        assert rb.finish == pytest.approx(ra.finish, abs=1e-6)


def test_block_events_keep_a_precise_router_index_in_sync() -> None:
    fleet = FleetState("precise")
    fleet.add_replica("r0", "m", "H100", BUILTIN_PROFILES["H100"], block_size=16)
    eng = SimEngine("H100", "r0", block_size=16, kv_capacity_tokens=300 * 16, on_event=fleet.apply)
    rng = random.Random(5)
    reqs = [
        Req(f"q{i}", i * 0.05, 16 * rng.randint(5, 60) + 3, rng.randint(1, 50), hashes(i % 9, 60))
        for i in range(200)
    ]
    simulate(eng, reqs)
    idx = fleet.replicas["r0"].index
    assert set(idx._blocks) == set(eng.pool.cached)
    stored = len(eng.pool.cached)
    assert stored > 0


def test_output_block_hashes_let_the_next_turn_hit_the_answer() -> None:
    eng = SimEngine("H100", block_size=16)
    conv = hashes(9, 40)
    # turn 1: 300-token prompt (18 full blocks), 200-token answer fills blocks 18..31
    simulate(eng, [Req("t1", 0.0, 300, 200, conv[:18], output_block_hashes=conv[18:31])])
    recs = simulate(eng, [Req("t2", 30.0, 600, 5, conv[:37])])
    t2 = next(r for r in recs if r.request_id == "t2")
    assert t2.cached_tokens == 31 * 16


def test_abort_frees_blocks_and_stops_the_request() -> None:
    eng = SimEngine("H100", block_size=16)
    eng.add_request("x", 1000, 500, hashes(1, 62), now=0.0)
    st = eng.schedule_step(0.0)
    assert st is not None
    eng.finish_step(st)
    assert eng.pool.usage > 0
    assert eng.abort("x", now=st.end)
    assert not eng.abort("x")
    assert eng.pool.usage == 0.0 and not eng.has_work()
    assert eng.metrics.records[-1].aborted


def test_events_are_batched_per_step() -> None:
    events: list[object] = []
    eng = SimEngine("H100", block_size=16, on_event=events.append)
    simulate(eng, [Req("a", 0.0, 1600, 3, hashes(1, 100))])
    stored = [ev for ev in events if isinstance(ev, BlockStored)]
    assert len(stored) == 1 and len(stored[0].block_hashes) == 100
    assert isinstance(events[-1], LoadSample) and events[-1].running == 0


def test_add_request_validates() -> None:
    eng = SimEngine("H100", block_size=16, kv_capacity_tokens=1024)
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("big", 2000, 10)
    with pytest.raises(ValueError):
        eng.add_request("zero", 0, 10)
    eng.add_request("ok", 100, 10)
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request("ok", 100, 10)
