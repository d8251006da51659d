"""The fleet benchmark's ceiling: pooled-cache hit rate, fluid rate, finite-run goodput ceiling; seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from corral.api.profiles import BUILTIN_PROFILES
from corral.bench.bound import finite_run_goodput, fluid_goodput, pooled_hit_rate, upper_bound
from corral.serve import bench_cli
from corral.serve.sim.workloads import Request, Workload

H100 = BUILTIN_PROFILES["H100"]


def _w(prompts: list[list[int]], block: int = 16) -> Workload:
    reqs = [Request(str(i), float(i), len(h) * block, 10, h) for i, h in enumerate(prompts)]
    return Workload("t", reqs, block, slo_ttft_s=1.0)


def test_pooled_hit_rate_counts_the_longest_cached_run_and_respects_capacity() -> None:
    w = _w([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 9, 9]])
    hit, uncached = pooled_hit_rate(w, capacity_blocks=100)
    # second: 4 blocks cached but one token is always recomputed (63 of 64); third: 2 blocks (32 of 64)
    assert hit == (63 + 32) / (3 * 64)
    assert uncached == (64 + 1 + 32) / 3
    small, _ = pooled_hit_rate(w, capacity_blocks=2)  # only the last two blocks survive: no leading hit
    assert small == 0.0
    assert pooled_hit_rate(w, 100, warmup=0.34)[0] == (63 + 32) / 128  # warmup excluded


def test_fluid_rate_grows_with_hits_and_fleet_size() -> None:
    w = _w([[k, k + 1000] for k in range(50)])
    one = fluid_goodput(w, [H100], uncached_mean=32)
    assert fluid_goodput(w, [H100, H100], uncached_mean=32) == 2 * one
    assert fluid_goodput(w, [H100], uncached_mean=1) > one


def test_finite_run_ceiling_tends_to_the_fluid_rate() -> None:
    assert math.isclose(finite_run_goodput(100.0, 10**9, 0.1, 2.0), 100.0, rel_tol=1e-6)
    assert finite_run_goodput(100.0, 1000, 0.1, 2.0) > 100.0  # a short run absorbs some backlog
    assert finite_run_goodput(100.0, 100, 0.1, 2.0) == math.inf  # the whole run fits in the SLO
    b = upper_bound(_w([[1, 2], [1, 2]]), [H100], 0.0)
    assert set(b) == {"prefix_hit_rate", "fluid_rps", "goodput_rps"} and b["goodput_rps"] >= b["fluid_rps"]


def test_bench_fleet_seeds_and_ceiling_in_results(tmp_path: Path) -> None:
    fleet = bench_cli.load("fleet")
    argv = ["--quick", "--policies", "corral", "--requests", "120", "--workloads", "zero_reuse"]
    rc = fleet.main([*argv, "--seeds", "0,1", "--workers", "1", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "fleet.json").read_text())
    fleet.validate(doc)
    w = doc["workloads"]["zero_reuse"]
    r = w["policies"]["corral"]
    assert set(r["goodput_by_seed"]) == {"0", "1"} and r["goodput_std_rps"] is not None
    assert r["goodput_rps"] == round(sum(r["goodput_by_seed"].values()) / 2, 6)
    assert w["ceiling"]["goodput_rps"] > 0 and r["of_ceiling"] is not None
    assert doc["meta"]["seeds"] == [0, 1]
    md = (tmp_path / "fleet.md").read_text()
    assert "**ceiling**" in md and " ± " in md
    assert fleet.main(["--seeds", "a,b", "--out", str(tmp_path)]) == 2


def test_routing_summary_copies_the_numbers_from_the_results(tmp_path: Path) -> None:
    from corral.bench import routing_summary

    def doc(
        goodputs: dict[str, float], seeds: dict[str, dict[str, float]] | None = None
    ) -> dict[str, object]:
        pols = {
            p: {
                "goodput_rps": g,
                "ttft_p99_s": 0.5,
                "prefix_hit_rate": 0.4,
                "goodput_by_seed": (seeds or {}).get(p, {"0": g}),
            }
            for p, g in goodputs.items()
        }
        return {"meta": {"command": "corral bench fleet", "git": "abc", "dirty": False},
                "workloads": {"w": {"policies": pols, "ceiling": {"goodput_rps": 20.0}}}}  # fmt: skip

    assert routing_summary.main([str(tmp_path)]) == 2  # no results yet
    (tmp_path / "fleet.json").write_text(json.dumps(doc({"corral": 10.0, "dualmap": 8.0, "random": 1.0})))
    (tmp_path / "seeds").mkdir()
    seeds = {"corral": {"1": 12.0, "2": 11.0}, "dualmap": {"1": 8.0, "2": 8.0}}
    (tmp_path / "seeds" / "fleet.json").write_text(json.dumps(doc({"corral": 11.5, "dualmap": 8.0}, seeds)))
    assert routing_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "routing_summary.md").read_text()
    assert "| w | 11.00 ± 1.00 (n=3) | dualmap | 8.00 ± 0.00 (n=3) | 1.38x | 20.0 | 55% | 40% |" in text
