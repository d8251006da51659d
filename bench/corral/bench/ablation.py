"""Ablation of the corral policy: goodput under the TTFT SLO with one mechanism switched off at a time.

    corral bench ablation [--quick] [--workloads A,B] [--out DIR]

Every variant is the shipped router (:class:`corral.router.core.RouterCore` with the RoutingPolicy CRD
defaults, see :func:`corral.serve.sim.fleet.fleet_settings`) with one change; the rows are:

- ``shipped``: the defaults;
- ``approximate index``: ``prefixIndex: approximate`` (the router's own dispatch record instead of the
  engines' KV events);
- ``no hotspot bound``: ``hotspot_c=None``;
- ``TTFT only``: ``charge_waiting=False`` (this request's TTFT alone, without the delay it adds to the
  requests waiting on the replica);
- ``no adapter paging``: the router's adapter pager off (``FleetConfig.paging=False``; only LoRA workloads
  have adapters to page, the others repeat ``shipped``).

Same workloads, fleet and goodput search as ``corral bench fleet`` (same arrivals per workload). Writes
``DIR/ablation.json`` (with the git revision and dirty flag) and ``DIR/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from corral.bench import DEFAULT_OUT
from corral.bench.fleet import GRID, WorkloadSpec, _cfg, _suite, build, capacity_estimate
from corral.bench.provenance import describe, provenance
from corral.serve.sim.fleet import DEFAULT_REPLICAS, goodput_search

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "shipped": ("corral", {}),
    "approximate index": ("corral@approximate", {}),
    "no hotspot bound": ("corral", {"hotspot_c": None}),
    "TTFT only": ("corral", {"charge_waiting": False}),
    "no adapter paging": ("corral", {}),
}
FLEET_CHANGES: dict[str, dict[str, Any]] = {"no adapter paging": {"paging": False}}
"""Variants that change the fleet run (:class:`~corral.serve.sim.fleet.FleetConfig`), not the policy."""


@dataclass(frozen=True)
class Job:
    spec: WorkloadSpec
    variant: str


def _run(job: Job) -> tuple[Job, float, float]:
    w = build(job.spec)
    key = (DEFAULT_REPLICAS, 0.05, 8, 32)
    cfg = replace(_cfg(key, job.spec.warmup), **FLEET_CHANGES.get(job.variant, {}))
    rates = tuple(round(capacity_estimate(w, cfg) * g, 3) for g in GRID)
    policy, params = VARIANTS[job.variant]
    t0 = time.perf_counter()
    res = goodput_search(w, policy, rates, config=cfg, policy_params=params)
    return job, res.goodput_rps, time.perf_counter() - t0


def run(quick: bool, workloads: Sequence[str], workers: int) -> dict[str, Any]:
    specs = _suite(quick)
    if workloads:
        specs = [s for s in specs if s.name in workloads]
        if not specs:
            raise ValueError(f"no such workloads {list(workloads)}; known: {[s.name for s in _suite(quick)]}")
    jobs = [Job(s, v) for s in specs for v in VARIANTS]
    t0 = time.perf_counter()
    results: dict[str, dict[str, float]] = {s.name: {} for s in specs}
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(max(1, workers)) as pool:
        for job, goodput, wall in pool.imap_unordered(_run, jobs):
            results[job.spec.name][job.variant] = round(goodput, 3)
            print(
                f"{job.spec.name:>16} {job.variant:<24} {goodput:8.2f} req/s ({wall:.0f} s)", file=sys.stderr
            )
    return {
        "workloads": results,
        "variants": {
            k: {"policy": p, "params": v, "fleet": FLEET_CHANGES.get(k, {})} for k, (p, v) in VARIANTS.items()
        },
        "meta": {"quick": quick, "replicas": DEFAULT_REPLICAS, "wall_s": round(time.perf_counter() - t0, 1)}
        | provenance(),
    }


def to_markdown(doc: dict[str, Any]) -> str:
    wl = doc["workloads"]
    names = list(wl)
    lines = [
        "# corral ablation: goodput (req/s) under the TTFT SLO, one mechanism off at a time",
        "",
        "| variant | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for v in doc["variants"]:
        cells = []
        for w in names:
            g, base = wl[w].get(v), wl[w].get("shipped")
            rel = f" ({(g / base - 1) * 100:+.0f}%)" if g is not None and base and v != "shipped" else ""
            cells.append(f"{g:.1f}{rel}" if g is not None else "-")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    m = doc["meta"]
    lines += ["", f"{m['replicas']}, {m['wall_s']} s wall on {m['machine']}, {describe(m)}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench ablation", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick suite (smaller workloads)")
    ap.add_argument("--workloads", default="", help="comma-separated subset of the suite")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    a = ap.parse_args(argv)
    try:
        doc = run(a.quick, [x.strip() for x in a.workloads.split(",") if x.strip()], a.workers)
    except ValueError as e:
        print(f"corral bench ablation: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = to_markdown(doc)
    (a.out / "ablation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
