"""The fleet runner and the fleet benchmark: same arrivals for every policy, a valid fleet.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.policies import make_policy
from corral.router.policies._common import BasePolicy
from corral.router.policy import PolicyRegistry
from corral.serve import bench_cli
from corral.serve.sim import workloads as W
from corral.serve.sim.fleet import FleetConfig, goodput_search, parse_policy, parse_replicas, run_fleet


def test_parse_replicas_and_policy_specs() -> None:
    reps = parse_replicas("H100:2,a100:1,H100:1")
    assert [r for r, _ in reps] == ["h100-0", "h100-1", "a100-80gb-0", "h100-2"]
    assert reps[2][1] is BUILTIN_PROFILES["A100-80GB"]
    with pytest.raises(ValueError):
        parse_replicas("H100:x")
    assert parse_policy("corral") == ("corral", "precise")
    assert parse_policy("dualmap") == ("dualmap", "precise")  # the CRD's prefixIndex default
    assert parse_policy("approx_prefix") == ("approx_prefix", "approximate")  # SGLang's own tree
    assert parse_policy("corral@approximate") == ("corral", "approximate")


def test_fleet_run_is_deterministic_and_prefix_affinity_pays() -> None:
    w = W.shared_prefix(400, groups=16, seed=2)
    cfg = FleetConfig(replicas=parse_replicas("H100:2,A100-80GB:2"))
    a = run_fleet(w, "dualmap", scale=30 / w.base_rate, config=cfg)
    b = run_fleet(w, "dualmap", scale=30 / w.base_rate, config=cfg)
    assert a.ttft.tolist() == b.ttft.tolist()
    rr = run_fleet(w, "round_robin", scale=30 / w.base_rate, config=cfg)
    assert a.completed == rr.completed == a.measured
    assert a.prefix_hit_rate > rr.prefix_hit_rate
    assert a.imbalance >= 1.0


def test_goodput_search_brackets_the_slo() -> None:
    w = W.zero_reuse(300, seed=1)
    cfg = FleetConfig(replicas=parse_replicas("H100:2"))
    res = goodput_search(w, "least_loaded", [5, 10, 20, 40], config=cfg, bisect_steps=2)
    assert res.best is not None and res.goodput_rps > 0
    assert res.best.pct(90) <= w.slo_ttft_s
    failing = [r for r in res.runs if r.scale > res.best.scale]
    assert failing and all(r.saturated or r.pct(90) > w.slo_ttft_s for r in failing)


def test_a_policy_sees_engine_events_in_precise_mode() -> None:
    w = W.shared_prefix(200, groups=4, seed=3)
    seen = {}

    class Spy(BasePolicy):
        name = "spy"

        def __init__(self, **params: object) -> None:
            super().__init__(**params)
            self.inner = make_policy("round_robin")

        def choose(self, req, fleet, now, explain=False):  # type: ignore[no-untyped-def]
            seen["blocks"] = sum(len(r.index) for r in fleet.replicas.values())
            seen["samples"] = sum(r.last_sample is not None for r in fleet.replicas.values())
            return self.inner.choose(req, fleet, now, explain)

    reg = PolicyRegistry([Spy])
    run_fleet(
        w, "spy@precise", scale=1.0, config=FleetConfig(replicas=parse_replicas("H100:2")), policies=reg
    )
    assert seen["blocks"] > 0 and seen["samples"] == 2


def test_the_fleet_runs_the_routers_adapter_pager_on_lora_workloads() -> None:
    """The shipped pager (RoutingPolicy adapterPaging defaults) plans in the fleet run: a hot adapter is
    replicated, and no round re-plans what it already did (no prefetch/unload churn)."""
    w = W.lora_zipf(16, 2000, zipf_s=1.2, seed=4)
    cfg = FleetConfig(replicas=parse_replicas("H100:2,A100-80GB:2"), max_loras=4, max_cpu_loras=8)
    on = run_fleet(w, "corral", scale=2.0, config=cfg)
    off = run_fleet(w, "corral", scale=2.0, config=FleetConfig(**{**cfg.__dict__, "paging": False}))
    assert off.paged == 0 and on.paged > 0
    rounds = on.sim_end_s / 0.5  # PagingConfig.interval_s
    assert on.paged < rounds  # not a load or prefetch every round
    assert on.completed == on.measured and off.completed == off.measured


def test_bench_fleet_quick_writes_a_valid_fleet_json(tmp_path: Path) -> None:
    fleet = bench_cli.load("fleet")
    rc = fleet.main(
        [
            "--quick",
            "--policies",
            "corral,round_robin",
            "--requests",
            "200",
            "--workloads",
            "shared_prefix,lora_zipf_128",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "fleet.json").read_text())
    fleet.validate(doc)
    assert set(doc["workloads"]) == {"shared_prefix", "lora_zipf_128"}
    for w in doc["workloads"].values():
        assert set(w["policies"]) == {"corral", "round_robin"}
        for r in w["policies"].values():
            assert r["goodput_rps"] > 0 and r["curve"]
    assert (tmp_path / "fleet.md").read_text().startswith("# Fleet benchmark")
    for png in ("fleet_ttft_vs_rate.png", "fleet_prefix_hit.png", "fleet_adapter_loads.png"):
        assert (tmp_path / png).stat().st_size > 1000
