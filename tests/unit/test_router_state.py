"""Replica state: approximate LRU index bounded by capacity and prefix-closed, precise mode events."""

from __future__ import annotations

from corral.router.events import (
    AdapterLoaded,
    AdapterUnloaded,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    LoadSample,
)
from corral.router.state import PrefixIndex
from router_testkit import fleet, prompt, req


def test_approximate_index_is_bounded_lru_and_evicts_tails_first() -> None:
    f = fleet(1, kv_blocks=10)
    r = f.replicas["r000"]
    a, b = req("a", prompt(1, 16 * 8)), req("b", prompt(2, 16 * 6))
    f.on_dispatch("r000", a)
    assert r.index.match(a.block_hashes) == 8
    f.on_dispatch("r000", b)
    assert len(r.index) == 10  # bounded by capacity
    assert r.index.match(b.block_hashes) == 6
    # a's tail was evicted, its head kept: still a 4-block prefix hit (prefix closure)
    assert r.index.match(a.block_hashes) == 4 == r.index.match_exact(a.block_hashes)


def test_galloping_match_equals_exact_walk_on_prefix_closed_index() -> None:
    idx = PrefixIndex(10_000, prefix_closed=True)
    hs = list(range(1, 3000))
    for k in (0, 1, 2, 3, 7, 8, 100, 1024, 2998, 2999):
        idx.clear()
        idx.insert(hs[:k])
        assert idx.match(hs) == k == idx.match_exact(hs)


def test_precise_mode_follows_engine_events() -> None:
    f = fleet(1, mode="precise")
    r = f.replicas["r000"]
    q = req("a", prompt(3, 16 * 5))
    f.on_dispatch("r000", q)
    # dispatch counts the sent blocks until the engine confirms them (or the grace passes)
    assert r.index.match(q.block_hashes) == 5 and len(r.unconfirmed) == 5
    hs = tuple(q.block_hashes)
    f.apply(BlockStored("r000", hs))
    assert r.index.match(q.block_hashes) == 5 and not r.unconfirmed
    f.apply(BlockRemoved("r000", hs[2:3]))  # a hole: precise match stops there
    assert r.index.match(q.block_hashes) == 2
    f.apply(AllBlocksCleared("r000"))
    assert r.index.match(q.block_hashes) == 0
    f.apply(BlockStored("nope", hs))  # unknown replica: ignored


def test_approximate_mode_ignores_block_events() -> None:
    f = fleet(1)
    q = req("a", prompt(4, 64))
    f.apply(BlockStored("r000", tuple(q.block_hashes)))
    assert f.replicas["r000"].index.match(q.block_hashes) == 0


def test_adapter_events_and_tiers() -> None:
    f = fleet(1, mode="precise")
    r = f.replicas["r000"]
    assert r.adapter_tier("x") == "disk" and r.adapter_tier(None) == "gpu"
    f.apply(AdapterLoaded("r000", "x", "cpu"))
    assert r.adapter_tier("x") == "cpu"
    f.apply(AdapterLoaded("r000", "x", "gpu"))
    assert r.adapter_tier("x") == "gpu" and "x" not in r.adapters_cpu
    f.apply(AdapterUnloaded("r000", "x", "gpu"))
    assert r.adapter_tier("x") == "disk"


def test_accounting_dispatch_first_token_finish() -> None:
    f = fleet(1)
    r = f.replicas["r000"]
    q = req("a", prompt(5, 100))
    f.on_dispatch("r000", q)
    assert r.pending_prefill_tokens == 100 and r.outstanding == 1 and r.waiting_requests == 1
    f.on_first_token("r000", "a")
    f.on_first_token("r000", "a")  # idempotent
    assert r.pending_prefill_tokens == 0 and r.decode_requests == 1 and r.waiting_requests == 0
    f.on_finish("r000", "a")
    assert r.outstanding == 0 and r.decode_requests == 0
    q2 = req("b", prompt(5, 100))  # same prompt: 6 full blocks cached
    f.on_dispatch("r000", q2)
    assert r.pending_prefill_tokens == 100 - 6 * 16
    f.on_finish("r000", "b")  # finished before first token
    assert r.pending_prefill_tokens == 0


def test_membership_and_health_bump_version() -> None:
    f = fleet(3)
    v = f.version
    f.set_healthy("r001", False)
    assert [r.replica_id for r in f.candidates("m")] == ["r000", "r002"] and f.version > v
    f.remove_replica("r000")
    assert [r.replica_id for r in f.candidates("m")] == ["r002"]
    f.apply(LoadSample("r002", 1.0, 2, 3, 400, 900, 0.5))
    assert f.replicas["r002"].last_sample is not None


def test_load_samples_age_on_the_routers_clock_not_the_engines() -> None:
    """A sample's ``time`` is the engine's clock (vLLM: wall time ~1.7e9; the sim: seconds since it
    started); freshness is judged by when the router received it, on the router's clock."""
    from corral.router.policies._common import fresh_sample, request_load, waiting_load

    t = [100.0]
    f = fleet(2)
    f.clock = lambda: t[0]
    vllm_like = LoadSample("r000", 1.7e9, 2, 9, 400, 900, 0.5)  # far "ahead" of the router's clock
    sim_like = LoadSample("r001", 3.0, 1, 7, 100, 200, 0.2)  # far "behind" it
    f.apply(vllm_like)
    f.apply(sim_like)
    a, b = f.replicas["r000"], f.replicas["r001"]
    assert a.sample_received_at == b.sample_received_at == 100.0
    assert fresh_sample(a, 100.5, 5.0) is vllm_like and fresh_sample(b, 100.5, 5.0) is sim_like
    assert request_load(a, 100.5, 5.0) == 11 and waiting_load(b, 100.5, 5.0) == 7
    # older than the max age on the router's clock: the router's own counts again
    assert fresh_sample(a, 105.5, 5.0) is None and fresh_sample(b, 105.5, 5.0) is None
    assert request_load(a, 105.5, 5.0) == 0 and waiting_load(b, 105.5, 5.0) == 0
    # a new sample is fresh again; an explicit receive time wins over the clock
    f.apply(LoadSample("r001", 4.0, 0, 1, 0, 0, 0.1), now=105.0)
    assert fresh_sample(b, 105.5, 5.0) is not None and b.sample_received_at == 105.0


def test_without_a_clock_the_sample_time_is_used() -> None:
    """Engines and router on one clock (the virtual-time simulator): no clock needed."""
    from corral.router.policies._common import fresh_sample

    f = fleet(1)
    f.apply(LoadSample("r000", 7.0, 1, 1, 0, 0, 0.0))
    r = f.replicas["r000"]
    assert r.sample_received_at == 7.0 and fresh_sample(r, 8.0, 5.0) is not None


def test_a_sample_counts_what_this_router_saw_since_live() -> None:
    """An engine sample trails the router: requests it counted as waiting that the router has since seen
    pass their first token (or finish) no longer look queued, and requests the router sent after it are
    added; load the router did not send (another router's) stays counted."""
    from corral.router.policies._common import decode_load, request_load, token_load, waiting_load

    f = fleet(1)
    r = f.replicas["r000"]
    for i in range(3):
        f.on_dispatch("r000", req(f"q{i}", prompt(i + 10, 100)))
    assert (r.pending_prefill_tokens, r.waiting_requests) == (300, 3)
    # the engine counts our 3 waiting plus 2 of another router's (200 tokens): 5 waiting, 500 tokens
    f.apply(LoadSample("r000", 1.0, 0, 5, 500, 0, 0.1), now=1.0)
    assert waiting_load(r, 1.0, 5.0) == 5 and token_load(r, 1.0, 5.0) == 500
    # ours start decoding and one finishes before the next sample: only the other router's 2 still wait
    for i in range(3):
        f.on_first_token("r000", f"q{i}")
    f.on_finish("r000", "q0")
    assert waiting_load(r, 1.5, 5.0) == 2 and token_load(r, 1.5, 5.0) == 200
    assert decode_load(r, 1.5, 5.0) == 2 and request_load(r, 1.5, 5.0) == 4
    # a request sent after the sample adds to it at once
    f.on_dispatch("r000", req("q9", prompt(99, 100)))
    assert waiting_load(r, 1.6, 5.0) == 3 and token_load(r, 1.6, 5.0) == 300
    # the sample never pulls the count below the router's own
    f.apply(LoadSample("r000", 2.0, 0, 0, 0, 0, 0.0), now=2.0)
    assert waiting_load(r, 2.0, 5.0) == 1 and token_load(r, 2.0, 5.0) == 100
