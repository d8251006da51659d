"""Per-policy behaviour (table-driven where possible), params validation, decision traces."""

from __future__ import annotations

import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.events import AdapterLoaded, BlockStored, LoadSample
from corral.router.explain import format_decision
from corral.router.policies import make_policy, policy_names
from corral.router.policy import NoReplicaError
from corral.router.request import request_from_block_ids
from corral.router.state import FleetState
from router_testkit import fleet, prompt, req

ALL = [
    "approx_prefix",
    "chbl",
    "corral",
    "dualmap",
    "dualmap_paper",
    "least_loaded",
    "lora_affinity",
    "pow2",
    "precise_prefix",
    "random",
    "round_robin",
]


def test_registry_names() -> None:
    assert policy_names() == ALL


@pytest.mark.parametrize("name", ALL)
def test_unknown_param_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"invalid params for policy .*bogus.*known params"):
        make_policy(name, bogus=1)


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        make_policy("nope")


@pytest.mark.parametrize("name", ALL)
def test_no_replica_error_names_the_model(name: str) -> None:
    f = fleet(2)
    with pytest.raises(NoReplicaError, match=r"'other'.*models served: m"):
        make_policy(name).choose(req("a", prompt(0, 64), model="other"), f, 0.0)
    for rid in list(f.replicas):
        f.set_healthy(rid, False)
    with pytest.raises(NoReplicaError, match="all unhealthy"):
        make_policy(name).choose(req("a", prompt(0, 64)), f, 0.0)


@pytest.mark.parametrize("name", ALL)
def test_explain_lists_candidates_and_reason(name: str) -> None:
    f = fleet(4)
    d = make_policy(name).choose(req("a", prompt(0, 300), adapter="x"), f, 0.0, explain=True)
    assert d.policy == name and d.reason
    assert d.candidates and d.replica_id in f.replicas
    assert all(c.total_s >= 0 and c.replica_id in f.replicas for c in d.candidates)
    text = format_decision(d)
    assert d.replica_id in text and "reason:" in text
    assert make_policy(name).choose(req("a", prompt(0, 300)), f, 0.0).candidates is None


def test_round_robin_cycles() -> None:
    f, p = fleet(3), make_policy("round_robin")
    got = [p.choose(req(str(i), prompt(i, 32)), f, 0.0).replica_id for i in range(6)]
    assert got == ["r000", "r001", "r002"] * 2


def test_random_is_seeded() -> None:
    f = fleet(8)
    picks = [
        [make_policy("random", seed=s).choose(req("a", prompt(0, 32)), f, 0.0).replica_id for _ in range(3)]
        for s in (1, 1, 2)
    ]
    assert picks[0] == picks[1]


@pytest.mark.parametrize(("by", "expected"), [("requests", "r000"), ("tokens", "r001")])
def test_least_loaded_by_requests_or_tokens(by: str, expected: str) -> None:
    f = fleet(2)
    f.on_dispatch("r000", req("big", prompt(1, 5000)))
    f.on_dispatch("r001", req("s1", prompt(2, 10)))
    f.on_dispatch("r001", req("s2", prompt(3, 10)))
    for p in ("least_loaded", "pow2"):
        assert make_policy(p, by=by).choose(req("n", prompt(4, 64)), f, 0.0).replica_id == expected


def test_load_sample_counts_when_fresh_only() -> None:
    f = fleet(2)
    f.apply(
        LoadSample("r000", 10.0, running=5, waiting=5, waiting_prefill_tokens=0, running_tokens=0, kv_usage=0)
    )
    p = make_policy("least_loaded")
    assert p.choose(req("a", prompt(0, 32)), f, 10.5).replica_id == "r001"
    assert {
        make_policy("least_loaded", seed=s).choose(req("a", prompt(0, 32)), f, 99.0).replica_id
        for s in range(8)
    } == {
        "r000",
        "r001",
    }


def test_chbl_home_then_bounded_spill() -> None:
    f, p = fleet(4), make_policy("chbl", c=1.25)
    q = req("a", prompt(0, 2048))
    home = p.choose(q, f, 0.0).replica_id
    assert all(p.choose(q, f, 0.0).replica_id == home for _ in range(3))
    for i in range(2):
        f.on_dispatch(home, req(f"x{i}", prompt(10 + i, 32)))
    d = p.choose(q, f, 0.0)  # cap = ceil(1.25 * 3 / 4) = 1 -> home is full
    assert d.replica_id != home and "hop" in d.reason


def test_approx_prefix_cache_hit_and_imbalance() -> None:
    f, p = fleet(3), make_policy("approx_prefix")
    q = req("a", prompt(0, 1600))
    f.on_dispatch("r002", q)
    assert p.choose(req("b", prompt(0, 1600)), f, 0.0).replica_id == "r002"
    d = p.choose(req("c", prompt(9, 1600)), f, 0.0)  # no match -> smallest tree
    assert d.replica_id in ("r000", "r001") and "smallest cache" in d.reason
    for i in range(70):
        f.on_dispatch("r002", req(f"l{i}", prompt(0, 16)))
    for i in range(5):
        f.on_dispatch("r001", req(f"m{i}", prompt(100 + i, 16)))
    d = p.choose(req("b", prompt(0, 1600)), f, 0.0)
    assert d.replica_id == "r000" and "imbalanced" in d.reason


def test_precise_prefix_uses_engine_events_and_queue() -> None:
    f, p = fleet(3, mode="precise"), make_policy("precise_prefix")
    q = req("a", prompt(0, 1600))
    f.apply(BlockStored("r001", tuple(q.block_hashes)))
    d = p.choose(q, f, 0.0)
    assert d.replica_id == "r001" and d.cached_blocks == 100
    for i in range(10):  # a long queue on r001 outweighs the prefix score (3*1 + 2*0 < 2*1 + ...)
        f.on_dispatch("r001", req(f"w{i}", prompt(50 + i, 32)))
    f.on_dispatch("r002", req("w", prompt(99, 32)))
    d = p.choose(q, f, 0.0)
    assert d.replica_id == "r001"  # 3 + 0 + 2 = 5 vs r000: 0 + 2 + 2 = 4
    p2 = make_policy("precise_prefix", prefix_weight=1.0)
    assert p2.choose(q, f, 0.0).replica_id == "r000"


def test_lora_affinity_prefers_resident_adapter() -> None:
    f, p = fleet(3, mode="precise"), make_policy("lora_affinity")
    f.apply(AdapterLoaded("r002", "x", "gpu"))
    f.apply(AdapterLoaded("r001", "x", "cpu"))
    assert p.choose(req("a", prompt(0, 64), adapter="x"), f, 0.0).replica_id == "r002"
    f.on_dispatch("r002", req("b", prompt(1, 64), adapter="x"))
    assert p.choose(req("a", prompt(0, 64), adapter="x"), f, 0.0).replica_id == "r001"


def test_dualmap_rules() -> None:
    f, p = fleet(8), make_policy("dualmap")
    q = request_from_block_ids("a", "m", [0, 1, 2, 3], 2048)
    f32 = fleet(8, block_size=512)
    d = p.choose(q, f32, 0.0, explain=True)
    assert "equal hits" in d.reason and d.candidates and len(d.candidates) == 2
    c1, c2 = (c.replica_id for c in d.candidates)
    f32.on_dispatch(c2, q)  # c2 becomes warm
    d = p.choose(request_from_block_ids("b", "m", [0, 1, 2, 3], 2048), f32, 0.0)
    assert d.replica_id == c2 and "cache affinity" in d.reason
    # overload the warm one beyond the SLO (5 s / 17.3 us per token ~ 289k tokens)
    for i in range(4):
        f32.on_dispatch(c2, request_from_block_ids(f"x{i}", "m", [1000 + i], 100_000))
    d = p.choose(request_from_block_ids("c", "m", [0, 1, 2, 3], 2048), f32, 0.0)
    assert d.replica_id == c1 and "SLO switch" in d.reason
    del f


def test_dualmap_hot_prefix_key_expands_on_shared_first_block() -> None:
    """Mooncake conversation: every request shares block 0; the key must grow to 2 blocks."""
    p = make_policy("dualmap")
    f = fleet(8, block_size=512)
    pairs = set()
    for i in range(300):
        ids = [0, 10_000 + i, 20_000 + i, 30_000 + i]
        d = p.choose(request_from_block_ids(str(i), "m", ids, 2048), f, 0.0, explain=True)
        assert d.candidates is not None
        if i >= 100:
            assert d.candidates[0].extra["key_depth"] == 2
            pairs.add(d.replica_id)
    assert len(pairs) >= 6  # spread over the fleet, not one pair


def test_corral_prefers_cached_replica_and_faster_gpu() -> None:
    f = FleetState()
    for i, g in enumerate(["L4", "L4", "H100"]):
        f.add_replica(f"r{i}", "m", g, BUILTIN_PROFILES[g])
    p = make_policy("corral")
    q = req("a", prompt(0, 8000))
    d = p.choose(q, f, 0.0, explain=True)
    assert d.replica_id == "r2" and d.reason.startswith("min cost")  # H100 prefills ~8x faster
    f.on_dispatch("r0", q)
    f.on_first_token("r0", "a")
    f.on_finish("r0", "a")
    d = p.choose(req("b", prompt(0, 8000)), f, 0.0, explain=True)
    assert d.replica_id == "r0" and d.cached_blocks == 500  # cached on an L4 beats cold on an H100
    assert d.candidates is not None
    terms = {c.replica_id: c for c in d.candidates}
    assert terms["r0"].prefill_s < terms["r2"].prefill_s
    assert terms["r2"].total_s == pytest.approx(
        terms["r2"].queue_s + terms["r2"].prefill_s + terms["r2"].adapter_s
    )


def test_corral_adapter_tiers_in_seconds() -> None:
    f, p = fleet(3, mode="precise"), make_policy("corral")
    f.apply(AdapterLoaded("r001", "x", "cpu"))
    f.apply(AdapterLoaded("r002", "x", "gpu"))
    d = p.choose(req("a", prompt(0, 500), adapter="x"), f, 0.0, explain=True)
    assert d.replica_id == "r002" and d.candidates is not None
    terms = {c.replica_id: c for c in d.candidates}
    assert terms["r002"].adapter_s == 0 and terms["r002"].adapter_tier == "gpu"
    assert 0 < terms["r001"].adapter_s < terms["r000"].adapter_s
    assert terms["r000"].adapter_tier == "disk"


def _done(f: FleetState, rid: str, q: object) -> None:
    f.on_dispatch(rid, q)  # type: ignore[arg-type]
    f.on_first_token(rid, q.request_id)  # type: ignore[attr-defined]
    f.on_finish(rid, q.request_id)  # type: ignore[attr-defined]


def test_corral_cache_first_follows_from_the_requests_waiting() -> None:
    """No tie window: a miss costs its prefill once for this request and once per request waiting behind
    it, so an idle cold replica wins only while nothing waits there."""
    f = fleet(3)
    _done(f, "r000", req("a", prompt(0, 16_000)))  # cached on r000 ...
    f.on_dispatch("r000", req("x", prompt(10, 20_000)))  # ... behind a 20k-token queue (~0.36 s)
    f.on_dispatch("r001", req("y", prompt(20, 30_000)))
    q = req("b", prompt(0, 16_000))  # cold on the idle r002: ~0.29 s
    p = make_policy("corral", hotspot_c=None)
    d = p.choose(q, f, 0.0, explain=True)
    assert d.replica_id == "r002" and d.cached_blocks == 0  # lower TTFT, nobody delayed
    for i in range(3):
        f.on_dispatch("r002", req(f"s{i}", prompt(40 + i, 64)))  # three short requests wait on r002
    d = p.choose(q, f, 0.0, explain=True)
    assert d.replica_id == "r000" and d.cached_blocks == 1000
    assert d.candidates is not None
    for c in d.candidates:
        charged = c.prefill_s * c.extra["waiting"] + c.adapter_s * c.extra["in_flight"]
        assert c.extra["cost_s"] == pytest.approx(c.total_s + charged, abs=1e-6)
    assert "waiting" in d.reason


def test_corral_over_slo_does_not_spread_cache_misses() -> None:
    """Earlier versions sent requests over the SLO to the least-loaded replica even when its estimate was
    worse: a cache miss that adds fleet work. Now the cost model's pick stands."""
    f = fleet(3)
    _done(f, "r000", req("a", prompt(0, 16_000)))
    f.on_dispatch("r000", req("x", prompt(10, 20_000)))
    f.on_dispatch("r001", req("y", prompt(20, 30_000)))
    f.on_dispatch("r002", req("z", prompt(30, 8_000)))  # least loaded, but 0.42 s cold vs 0.36 s cached
    q = req("b", prompt(0, 16_000))
    d = make_policy("corral", ttft_slo_s=0.2, hotspot_c=None).choose(q, f, 0.0, explain=True)
    assert d.replica_id == "r000" and d.cached_blocks == 1000 and "over SLO" in d.reason


def test_corral_slo_classes() -> None:
    f, p = fleet(2), make_policy("corral", ttft_slo_s=100.0, slo_classes={"fast": 0.001}, hotspot_c=None)
    _done(f, "r000", req("a", prompt(0, 8000)))
    f.on_dispatch("r000", req("z", prompt(5, 3000)))
    f.on_dispatch("r001", req("y", prompt(6, 1000)))
    assert p.choose(req("b", prompt(0, 8000)), f, 0.0).replica_id == "r000"
    d = p.choose(req("b", prompt(0, 8000), slo_class="fast"), f, 0.0)
    assert d.replica_id == "r000" and "over SLO 0.001s" in d.reason


def test_corral_hotspot_guard_bounds_pending_prefill_seconds() -> None:
    f, p = fleet(4), make_policy("corral", hotspot_c=1.25, ttft_slo_s=0.1)
    q = req("a", prompt(0, 16_000))
    f.on_dispatch("r003", q)
    for i in range(3):
        f.on_first_token("r003", "a")
        f.on_dispatch("r003", req(f"d{i}", prompt(0, 16_000)))
        f.on_first_token("r003", f"d{i}")
    # Decoding requests are not prefill work: the next turn stays with its cache.
    d = p.choose(req("b", prompt(0, 16_000)), f, 0.0)
    assert d.replica_id == "r003" and d.cached_blocks == 1000
    f.on_dispatch("r003", req("w", prompt(50, 10_000)))  # 10k uncached tokens queued: ~0.18 s
    d = p.choose(req("b", prompt(0, 16_000)), f, 0.0)  # > SLO 0.1 s and 1.25 x fleet mean ~0.05 s
    assert d.replica_id != "r003" and d.reason.startswith("hotspot bound")


def test_corral_narrows_to_few_candidates_on_large_pools() -> None:
    f, p = fleet(64), make_policy("corral")
    d = p.choose(req("a", prompt(0, 4000)), f, 0.0, explain=True)
    assert d.candidates is not None and len(d.candidates) <= 3  # the ring pair + the least loaded
    d = p.choose(req("a", prompt(0, 4000), adapter="x"), f, 0.0, explain=True)
    assert d.candidates is not None and len(d.candidates) <= 6  # + the adapter's pair and its holder
    d = make_policy("corral").choose(req("a", prompt(0, 4000)), fleet(8), 0.0, explain=True)
    assert d.candidates is not None and len(d.candidates) == 8


def test_corral_large_pool_finds_cache_via_ring_affinity() -> None:
    f, p = fleet(64), make_policy("corral")
    first = p.choose(req("a", prompt(0, 4000)), f, 0.0)
    _done(f, first.replica_id, req("a", prompt(0, 4000)))
    again = p.choose(req("b", prompt(0, 4000)), f, 0.0)
    assert again.replica_id == first.replica_id and again.cached_blocks == 250


@pytest.mark.parametrize("name", ALL)
def test_one_policy_instance_across_fleets(name: str) -> None:
    """Ring caches must not leak between FleetState objects with equal versions."""
    p = make_policy(name)
    a, b = fleet(20), FleetState()
    for i in range(20):
        b.add_replica(f"other{i}", "m", "H100", BUILTIN_PROFILES["H100"])
    assert a.version == b.version
    assert p.choose(req("x", prompt(0, 600)), a, 0.0).replica_id in a.replicas
    assert p.choose(req("x", prompt(0, 600)), b, 0.0).replica_id in b.replicas


@pytest.mark.parametrize("n", [8, 32])
def test_corral_spreads_when_every_request_shares_block_zero(n: int) -> None:
    """Mooncake conversation shape: a hot shared first block must not pull everything onto one replica
    under load (each request waits for its first token until n later ones were routed), and a
    conversation's next turn must still find its own prefix."""
    f, p = fleet(n, block_size=512), make_policy("corral")
    counts: dict[str, int] = {}
    live: list[tuple[str, str]] = []
    for i in range(400):
        ids = [0, 10_000 + i, 20_000 + i]
        q = request_from_block_ids(str(i), "m", ids, 1536)
        d = p.choose(q, f, 0.0)
        counts[d.replica_id] = counts.get(d.replica_id, 0) + 1
        f.on_dispatch(d.replica_id, q, d.cached_blocks)
        live.append((d.replica_id, q.request_id))
        if len(live) > n:  # the oldest finishes; its conversation's next turn finds its prefix
            rid, rq = live.pop(0)
            f.on_first_token(rid, rq)
            f.on_finish(rid, rq)
            j = int(rq)
            turn2 = request_from_block_ids(f"{j}b", "m", [0, 10_000 + j, 20_000 + j, 30_000 + j], 2048)
            assert p.choose(turn2, f, 0.0).cached_blocks == 3
    assert max(counts.values()) / 400 < 3 / n


def test_corral_adapter_load_is_charged_to_the_requests_waiting() -> None:
    """Loading an adapter stalls the batch: on a replica with requests in flight the load counts once per
    request there (and the prefill once per waiting one), so the adapter's holder wins though its queue
    is longer."""
    f = fleet(3, mode="precise")
    f.apply(AdapterLoaded("r001", "x", "gpu"))
    f.on_dispatch("r001", req("w", prompt(50, 8000)))  # the holder has more queued prefill
    for rid in ("r000", "r002"):
        for i in range(4):
            f.on_dispatch(rid, req(f"{rid}-{i}", prompt(60 + i, 256)))  # short requests wait elsewhere
    d = make_policy("corral").choose(req("q", prompt(7, 600), adapter="x"), f, 0.0, explain=True)
    assert d.replica_id == "r001" and d.candidates is not None
    costs = {c.replica_id: c for c in d.candidates}
    assert costs["r001"].total_s > min(c.total_s for c in d.candidates)  # not the lowest TTFT ...
    assert costs["r001"].extra["cost_s"] == min(c.extra["cost_s"] for c in d.candidates)  # ... lowest cost
