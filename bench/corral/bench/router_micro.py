"""Router micro-benchmark: per-decision latency of every routing policy, and prompt hashing cost.

Cases: 8, 32 and 128 replicas x 2k- and 32k-token prompts x with/without LoRA adapters. Decision latency
is measured on prompts that are already hashed (the router hashes once per request), on a warm fleet:
mixed GPU classes (H100, A100, L4), every prompt's prefix (25-100 %) cached on two random replicas,
random queued work, adapters resident on GPU/CPU. Hashing (16-token blocks, xxh3 chain) is timed apart.

    python -m corral.bench.router_micro [--quick] [--out DIR] [--runs K]
    corral bench router [--quick] [--out DIR]

Writes ``DIR/router.json`` ({"cases": [{"replicas", "prompt_tokens", "adapters", "decision_p50_us",
"decision_p99_us", "hash_us", ...}]}, the top-level numbers being the ``corral`` policy's) and
``DIR/router.md`` (default DIR: ./corral-bench/). With ``--runs K`` each case runs K times and the
median of the per-run percentiles is reported (the machine may be shared; ``load_avg`` is recorded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from corral.api.profiles import BUILTIN_PROFILES
from corral.bench import DEFAULT_OUT
from corral.bench.provenance import describe, provenance
from corral.router.core import RouterCore
from corral.router.hashing import block_hashes, salt_for
from corral.router.policies import policy_names
from corral.router.settings import router_settings
from corral.router.state import FleetState
from corral.router.types import RoutingRequest

BLOCK = 16
SYSTEM_PROMPT_TOKENS = 1024
REPLICAS = (8, 32, 128)
PROMPTS = (2048, 32768)
ADAPTERS = 8


def _gpu(i: int) -> str:
    return ("H100", "H100", "A100-80GB", "L4")[i % 4]


def build_case(
    n: int, prompt_tokens: int, adapters: bool, n_prompts: int, seed: int = 0, mode: str = "approximate"
) -> tuple[FleetState, list[RoutingRequest], list[np.ndarray], list[str | None]]:
    """A warm fleet and a set of already-hashed requests for one case (same content for both modes)."""
    rng = np.random.default_rng(seed)
    fleet = FleetState(mode)  # type: ignore[arg-type]
    for i in range(n):
        g = _gpu(i)
        fleet.add_replica(f"r{i:03d}", "llama", g, BUILTIN_PROFILES[g], block_size=BLOCK)
    ids = list(fleet.replicas)
    system = rng.integers(0, 50_000, SYSTEM_PROMPT_TOKENS, dtype=np.uint32)
    reqs, token_arrays, salts = [], [], []
    for k in range(n_prompts):
        body = rng.integers(0, 50_000, prompt_tokens - SYSTEM_PROMPT_TOKENS, dtype=np.uint32)
        toks = np.concatenate([system, body])
        adapter = f"lora-{k % ADAPTERS}" if adapters else None
        salt = salt_for(adapter)
        hs = block_hashes(toks, BLOCK, salt)
        reqs.append(RoutingRequest(f"q{k}", "llama", hs, prompt_tokens, 256, adapter))
        token_arrays.append(toks)
        salts.append(salt)
        for rid in rng.choice(ids, size=min(2, n), replace=False):
            frac = float(rng.uniform(0.25, 1.0))
            fleet.replicas[str(rid)].index.insert(hs[: max(1, int(len(hs) * frac))])
    # queued and running work (router accounting), adapter residency
    for j, rid in enumerate(ids):
        r = fleet.replicas[rid]
        for m in range(int(rng.integers(0, 6))):
            fake = RoutingRequest(f"bg-{j}-{m}", "llama", [], int(rng.integers(100, 8000)), 256, None)
            fleet.on_dispatch(rid, fake, cached_blocks=0)
            if rng.random() < 0.6:
                fleet.on_first_token(rid, fake.request_id)
        if adapters:
            picks = rng.choice(ADAPTERS, size=4, replace=False)
            r.adapters_gpu.update(f"lora-{a}" for a in picks[:2])
            r.adapters_cpu.update(f"lora-{a}" for a in picks[2:])
    return fleet, reqs, token_arrays, salts


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def time_decisions(policy_name: str, fleet: FleetState, reqs: list[RoutingRequest], n: int) -> list[float]:
    """Decision latency of the shipped router core (:meth:`RouterCore.route`: queue bound + policy) with the
    default RoutingPolicy's settings, only the strategy swapped."""
    shipped = router_settings(None)
    settings = (
        shipped
        if policy_name == shipped.strategy
        else replace(shipped, strategy=policy_name, policy_params={})
    )
    core = RouterCore(settings, clock=lambda: 0.0, fleet=fleet)
    route = core.route
    for q in reqs[: min(len(reqs), 20)]:  # warm-up (ring build, caches)
        route(q)
    out = []
    clock = time.perf_counter_ns
    m = len(reqs)
    gc.collect()
    for i in range(n):
        q = reqs[i % m]
        t0 = clock()
        route(q)
        out.append((clock() - t0) / 1e3)
    return out


def time_hashing(tokens: list[np.ndarray], salts: list[str | None], repeats: int) -> float:
    ts = []
    for i in range(repeats):
        toks, salt = tokens[i % len(tokens)], salts[i % len(salts)]
        t0 = time.perf_counter_ns()
        block_hashes(toks, BLOCK, salt)
        ts.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(ts)


def run_case(n: int, prompt_tokens: int, adapters: bool, quick: bool) -> dict[str, Any]:
    n_prompts = 16 if quick else 48
    decisions = 300 if quick else 3000
    per_policy = 100 if quick else 600
    fleet, reqs, toks, salts = build_case(n, prompt_tokens, adapters, n_prompts)
    main = time_decisions("corral", fleet, reqs, decisions)
    case: dict[str, Any] = {
        "replicas": n,
        "prompt_tokens": prompt_tokens,
        "adapters": adapters,
        "decision_p50_us": _pct(main, 50),
        "decision_p99_us": _pct(main, 99),
        "decision_mean_us": float(np.mean(main)),
        "hash_us": time_hashing(toks, salts, 20 if quick else 60),
        "policies": {},
    }
    # The same state with a precise (engine-event) index: exact O(matched blocks) walks, no galloping.
    pf, preqs, _, _ = build_case(n, prompt_tokens, adapters, n_prompts, mode="precise")
    precise = time_decisions("corral", pf, preqs, per_policy)
    case["decision_precise_index_p50_us"] = _pct(precise, 50)
    case["decision_precise_index_p99_us"] = _pct(precise, 99)
    for name in policy_names():
        xs = main if name == "corral" else time_decisions(name, fleet, reqs, per_policy)
        case["policies"][name] = {"p50_us": _pct(xs, 50), "p99_us": _pct(xs, 99)}
    return case


def _median_case(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    keys = ["decision_p50_us", "decision_p99_us", "decision_mean_us", "hash_us"]
    keys += ["decision_precise_index_p50_us", "decision_precise_index_p99_us"]
    for k in keys:
        out[k] = statistics.median(r[k] for r in runs)
    out["policies"] = {
        name: {m: statistics.median(r["policies"][name][m] for r in runs) for m in runs[0]["policies"][name]}
        for name in runs[0]["policies"]
    }
    out["runs"] = len(runs)
    return out


def run(quick: bool, out_dir: Path, runs: int | None = None) -> dict[str, Any]:
    """Run every case (``runs`` times each, median reported) and write router.json and router.md."""
    runs = runs or (1 if quick else 3)
    cases = []
    for n in REPLICAS:
        for pt in PROMPTS:
            for ad in (False, True):
                cases.append(_median_case([run_case(n, pt, ad, quick) for _ in range(runs)]))
    result: dict[str, Any] = {
        "cases": cases,
        "meta": {
            "quick": quick,
            "runs": runs,
            "block_size": BLOCK,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "note": "top-level decision_* numbers are the corral policy; prompts are pre-hashed",
            **provenance(),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "router.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "router.md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Router micro-benchmark",
        "",
        f"`corral bench router{' --quick' if meta['quick'] else ''}`: Python {meta['python']}, "
        f"{meta['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in meta['load_avg'] or [])} at the "
        f"end; median of {meta['runs']} run(s). Decision latency on pre-hashed prompts (corral policy); "
        f"hashing = xxh3 chain over {meta['block_size']}-token blocks. {describe(meta)}.",
        "",
        "| replicas | prompt tokens | adapters | decision p50 (µs) | decision p99 (µs) | hash (µs) "
        "| precise index p50 / p99 (µs) |",
        "|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        lines.append(
            f"| {c['replicas']} | {c['prompt_tokens']} | {'yes' if c['adapters'] else 'no'} | "
            f"{c['decision_p50_us']:.1f} | {c['decision_p99_us']:.1f} | {c['hash_us']:.1f} | "
            f"{c['decision_precise_index_p50_us']:.1f} / {c['decision_precise_index_p99_us']:.1f} |"
        )
    names = list(result["cases"][0]["policies"])
    lines += ["", "Per policy, decision p50 / p99 (µs):", ""]
    lines.append("| replicas | prompt | adapters | " + " | ".join(names) + " |")
    lines.append("|---:|---:|:---:|" + "---:|" * len(names))
    for c in result["cases"]:
        cells = [f"{c['policies'][n]['p50_us']:.0f} / {c['policies'][n]['p99_us']:.0f}" for n in names]
        lines.append(
            f"| {c['replicas']} | {c['prompt_tokens']} | {'yes' if c['adapters'] else 'no'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench router", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer decisions per case, one run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    ap.add_argument(
        "--runs", type=int, default=None, help="runs per case, median reported (default 3; 1 quick)"
    )
    args = ap.parse_args(argv)
    res = run(args.quick, args.out, args.runs)
    sys.stdout.write(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
