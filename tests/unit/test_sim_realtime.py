"""The wall-clock driver streams tokens from the same engine core, with timing close to virtual time."""

from __future__ import annotations

import asyncio
import time

import pytest
from corral.router.events import AdapterLoaded
from corral.serve.sim import RealtimeSimEngine, RequestSpec, SimEngine, simulate
from sim_testkit import Req, hashes


async def _consume(eng: RealtimeSimEngine, spec: RequestSpec) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    first = None
    toks = []
    async for tok in eng.generate(spec):
        if first is None:
            first = time.perf_counter() - t0
        toks.append(tok)
    assert first is not None
    return toks, first, time.perf_counter() - t0


async def test_wall_clock_driver_streams_tokens_and_tracks_virtual_time() -> None:
    scale = 10.0  # 10 model seconds per wall second
    specs = [RequestSpec(f"q{i}", 3000 + 1000 * i, 40, hashes(i, 150)) for i in range(3)]
    rt = RealtimeSimEngine(SimEngine("A100-80GB", "rt"), time_scale=scale)
    try:
        results = await asyncio.gather(*(_consume(rt, s) for s in specs))
    finally:
        await rt.close()
    for spec, (toks, _first, _total) in zip(specs, results, strict=True):
        assert len(toks) == spec.max_tokens
    # the same requests, arriving together, in virtual time
    virt = {
        r.request_id: r
        for r in simulate(
            SimEngine("A100-80GB", "vt"),
            [Req(s.request_id, 0.0, s.prompt_tokens, s.max_tokens, list(s.block_hashes)) for s in specs],
        )
    }
    for spec, (_toks, first, total) in zip(specs, results, strict=True):
        v = virt[spec.request_id]
        assert v.ttft is not None
        # loose bound: wall time (in model seconds) within 50% + 0.5 model-s of virtual time
        assert first * scale == pytest.approx(v.ttft, rel=0.5, abs=0.5)
        assert total * scale == pytest.approx(v.finish - v.arrival, rel=0.5, abs=0.5)
    recs = rt.engine.metrics.records
    assert len(recs) == 3 and all(r.ttft is not None for r in recs)


async def test_wall_clock_abort_and_adapter_load() -> None:
    events: list[object] = []
    rt = RealtimeSimEngine(SimEngine("H100", "rt", max_loras=2, on_event=events.append), time_scale=50.0)
    try:
        tier = await rt.load_adapter("x", "gpu", 85.0)
        assert tier == "gpu"
        assert any(isinstance(e, AdapterLoaded) and e.adapter == "x" for e in events)
        gen = rt.generate(RequestSpec("long", 500, 10_000, adapter="x"))
        got = 0
        async for _ in gen:
            got += 1
            if got == 5:
                break
        await gen.aclose()  # the consumer went away: the request is aborted
        assert "long" not in rt.engine.seqs
        assert rt.engine.pool.usage == 0.0
        assert rt.stats()["vllm:num_requests_running"] == 0
        assert rt.unload_adapter("x") == "disk"
    finally:
        await rt.close()
