"""Fleet benchmark: trace replay and synthetic workloads through N simulated vLLM replicas, every policy.

    python -m corral.bench.fleet [--quick] [--trace FILE ...] [--policies NAME,...] [--replicas SPEC]
                                 [--out DIR]
    corral bench fleet [same options]

For each workload and policy (same arrival sequence for all), a fleet of sim engines
(:mod:`corral.serve.sim`, default ``H100:4,A100-80GB:4``) is driven in virtual time by the production
policy code; engine events reach the router after ``--event-delay`` (50 ms). Per workload and policy:

- **goodput** (``goodput_rps``): the highest arrival rate at which P90 TTFT <= the workload's SLO, found
  on a rate grid (0.3-1.2 x an estimate of the fleet's capacity for that workload) and refined by
  bisection; the number is completed requests per second at that rate;
- at a **reference rate** shared by all policies of the workload (``REF_FRACTION`` x the best goodput of
  the load-only baselines round_robin / random / least_loaded / pow2): P50/P90/P99 TTFT, TPOT P50,
  prefix-cache hit rate (tokens), adapter loads per 1k requests, load imbalance (max / mean busy time);
- the TTFT-vs-rate curve (the grid runs).
The first ``warmup`` share of requests (cold caches) is excluded from every metric.

Writes ``DIR/fleet.json`` (per policy the ``CONTRACT_KEYS`` that other tools read, plus extra fields),
``DIR/fleet.md`` and PNG plots (default DIR: ./corral-bench/). Without ``--trace`` the default suite runs:
the Mooncake conversation trace (``<repo>/../shared/traces/mooncake/conversation_trace.jsonl``, or the
1,500-request sample in ``corral/bench/data/`` when the shared file is absent) and the synthetic workloads of
:mod:`corral.serve.sim.workloads`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.bench import DATA, DEFAULT_OUT, checkout_root
from corral.bench.bound import upper_bound
from corral.bench.provenance import describe, provenance
from corral.router.policies import policy_names
from corral.serve.sim import workloads as W
from corral.serve.sim.fleet import (
    DEFAULT_REPLICAS,
    FleetConfig,
    RunResult,
    describe_fleet,
    goodput_search,
    parse_policy,
    parse_replicas,
    run_fleet,
)

CHECKOUT = checkout_root()
REPO = CHECKOUT or Path.cwd()  # paths in results are written relative to this; git runs here
SHARED_TRACE = REPO.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
SAMPLE_TRACE = DATA / "conversation_trace_head.jsonl"
LOAD_ONLY = ("round_robin", "random", "least_loaded", "pow2")
REF_FRACTION = 0.8
# Per-policy fields of fleet.json that readers of the file may rely on (goodput first; the rest are
# measured at the reference rate); validate() checks them.
CONTRACT_KEYS = (
    "goodput_rps",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "prefix_hit_rate",
    "adapter_loads_per_1k",
    "imbalance",
)
GRID = (0.3, 0.5, 0.7, 0.9, 1.2)


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build one workload (picklable: workers rebuild it, deterministically)."""

    name: str
    kind: str
    n: int
    kwargs: tuple[tuple[str, Any], ...] = ()
    warmup: float = 0.1
    seed: int = 0
    """Generator seed (synthetic workloads: arrivals, contents; traces: the spreading of equal timestamps)."""


def _suite(quick: bool) -> list[WorkloadSpec]:
    q = quick
    conv_n = 500 if q else 4000
    return [
        WorkloadSpec("conversation", "mooncake", conv_n, (("path", ""),), warmup=0.125),
        WorkloadSpec("shared_prefix", "shared_prefix", 500 if q else 2500),
        *([] if q else [WorkloadSpec("multi_turn", "multi_turn", 500)]),
        WorkloadSpec("zero_reuse", "zero_reuse", 500 if q else 2500),
        *([] if q else [WorkloadSpec("lora_zipf_16", "lora_zipf", 3000, (("n_adapters", 16),))]),
        WorkloadSpec("lora_zipf_128", "lora_zipf", 600 if q else 3000, (("n_adapters", 128),)),
        *([] if q else [WorkloadSpec("lora_zipf_1024", "lora_zipf", 3000, (("n_adapters", 1024),))]),
        *([] if q else [WorkloadSpec("bursty", "bursty", 2500)]),
    ]


def default_trace() -> Path:
    return SHARED_TRACE if SHARED_TRACE.exists() else SAMPLE_TRACE


@functools.lru_cache(maxsize=16)
def build(spec: WorkloadSpec) -> W.Workload:
    kw = dict(spec.kwargs)
    if spec.kind == "mooncake":
        path = Path(kw.pop("path") or default_trace())
        w = W.load_mooncake(path, limit=spec.n, name=spec.name, seed=spec.seed)
        w.meta["trace"] = _rel(path)
    elif spec.kind == "trace":
        path = Path(kw.pop("path"))
        seed_kw = {} if ".csv" in path.name else {"seed": spec.seed}
        w = W.load_trace(path, limit=spec.n or None, name=spec.name, **seed_kw)
        w.meta["trace"] = _rel(path)
    elif spec.kind == "shared_prefix":
        w = W.shared_prefix(spec.n, seed=spec.seed, **kw)
    elif spec.kind == "multi_turn":
        w = W.multi_turn(spec.n, seed=spec.seed, **kw)
    elif spec.kind == "zero_reuse":
        w = W.zero_reuse(spec.n, seed=spec.seed, **kw)
    elif spec.kind == "lora_zipf":
        w = W.lora_zipf(n_requests=spec.n, name=spec.name, seed=spec.seed, **kw)
    elif spec.kind == "bursty":
        w = W.bursty(spec.n, seed=spec.seed, **kw)
    else:
        raise ValueError(f"unknown workload kind {spec.kind!r}")
    w.name = spec.name
    return w


def _rel(path: Path) -> str:
    """``path`` relative to the checkout (symlinks kept, so no machine-specific target leaks into results);
    a path outside the checkout's parent folder is recorded by its name only."""
    try:
        rel = os.path.relpath(path.absolute(), REPO)
    except ValueError:
        return path.name
    return path.name if rel.startswith(os.pardir + os.sep + os.pardir) else rel


def capacity_estimate(w: W.Workload, cfg: FleetConfig) -> float:
    """Rough fleet capacity (req/s) for a workload: per replica, one request costs its prefill (the
    reusable share assumed hit) plus its decode share at a batch of 32; summed over replicas. Only used
    to place the rate grid (the search extends it either way)."""
    reqs = w.requests
    p = sum(r.prompt_tokens for r in reqs) / len(reqs)
    o = sum(r.max_tokens for r in reqs) / len(reqs)
    reuse = W.prefix_reuse(reqs, w.block_size)
    cap = 0.0
    for _, prof in cfg.replicas:
        per_req = p * (1 - reuse) * prof.b1_us + o * (prof.b0_us / 32 + prof.b2_us)
        cap += 1e6 / per_req
    return cap


# ---- tasks (run in worker processes) -----------------------------------------------------------------
@dataclass
class Task:
    phase: str  # "search" or "ref"
    spec: WorkloadSpec
    policy: str
    cfg_key: tuple[str, float, int, int] | tuple[str, float, int, int, int]
    rates: tuple[float, ...] = ()
    rate: float = 0.0
    bisect: int = 3


def _cfg(key: tuple[str, float, int, int] | tuple[str, float, int, int, int], warmup: float) -> FleetConfig:
    replicas, delay, max_loras, max_cpu = key[:4]
    return FleetConfig(
        replicas=parse_replicas(replicas),
        event_delay_s=delay,
        max_loras=max_loras,
        max_cpu_loras=max_cpu,
        warmup_fraction=warmup,
        cpu_kv_tokens=key[4] if len(key) > 4 else 0,
    )


def _curve_point(r: RunResult) -> dict[str, Any]:
    s = r.summary()
    return {
        "rate_rps": round(s["rate_rps"] * 1, 4),
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p90_s": s["ttft_p90_s"],
        "ttft_p99_s": s["ttft_p99_s"],
        "slo_attainment": s["slo_attainment"],
        "saturated": s["saturated"],
    }


def run_task(task: Task) -> tuple[Task, dict[str, Any]]:
    w = build(task.spec)
    cfg = _cfg(task.cfg_key, task.spec.warmup)
    t0 = time.perf_counter()
    if task.phase == "search":
        res = goodput_search(w, task.policy, task.rates, config=cfg, bisect_steps=task.bisect)
        base = w.base_rate
        curve = [_curve_point(r) for r in res.runs]  # grid, extension and bisection runs, by rate
        out: dict[str, Any] = {
            "goodput_rps": res.goodput_rps,
            "goodput_rate_rps": res.best.scale * base if res.best else 0.0,
            "curve": curve,
            "runs": len(res.runs),
        }
    else:
        r = run_fleet(w, task.policy, scale=task.rate / w.base_rate, config=cfg, stop_fraction=0.6)
        out = r.summary()
        out["decide_us_mean"] = r.decide_us_mean
        out["adapter_disk_loads_per_1k"] = 1000.0 * r.adapter_disk_loads / max(1, r.measured)
        out["ref_saturated"] = r.saturated
    out["wall_s"] = time.perf_counter() - t0
    return task, out


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def execute(tasks: list[Task], workers: int, desc: str) -> list[tuple[Task, dict[str, Any]]]:
    from tqdm import tqdm

    out: list[tuple[Task, dict[str, Any]]] = []
    bar = tqdm(total=len(tasks), desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1:
            for t in tasks:
                out.append(run_task(t))
                bar.update(1)
        else:
            ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for res in pool.imap_unordered(run_task, tasks):
                    out.append(res)
                    bar.set_postfix_str(f"{res[0].spec.name}/{res[0].policy}", refresh=False)
                    bar.update(1)
    finally:
        bar.close()
    return out


# ---- the benchmark ---------------------------------------------------------------------------------
@dataclass
class Options:
    quick: bool = False
    traces: list[Path] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    replicas: str = DEFAULT_REPLICAS
    out: Path = DEFAULT_OUT
    workers: int = 2
    event_delay_s: float = 0.05
    max_loras: int = 8
    max_cpu_loras: int = 32
    requests: int | None = None
    workloads: list[str] = field(default_factory=list)
    plots: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    cpu_kv_tokens: int = 0
    """Per replica: the sim engines' CPU KV tier (:mod:`corral.serve.sim.kv_offload`); 0 = none."""
    """Workload seeds: the goodput search runs once per seed (the first seed also gives the reference-rate
    figures); each policy's goodput is the mean over seeds, reported with its spread."""


def specs_for(opts: Options) -> list[WorkloadSpec]:
    if opts.traces:
        specs = []
        for p in opts.traces:
            if not p.exists():
                raise FileNotFoundError(f"trace not found: {p}")
            stem = p.name.split(".")[0]
            n = opts.requests or (600 if opts.quick else 4000)
            specs.append(WorkloadSpec(stem, "trace", n, (("path", str(p)),), warmup=0.125))
        return specs
    specs = _suite(opts.quick)
    if opts.workloads:
        known = {s.name for s in specs} | {s.name for s in _suite(False)}
        unknown = set(opts.workloads) - known
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; known: {sorted(known)}")
        specs = [s for s in _suite(False) + _suite(True) if s.name in opts.workloads]
        seen: set[str] = set()
        specs = [s for s in specs if not (s.name in seen or seen.add(s.name))]  # type: ignore[func-returns-value]
        if opts.quick:
            specs = [WorkloadSpec(s.name, s.kind, min(s.n, 800), s.kwargs, s.warmup) for s in specs]
    if opts.requests:
        specs = [WorkloadSpec(s.name, s.kind, opts.requests, s.kwargs, s.warmup) for s in specs]
    return specs


def run(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    names = opts.policies or policy_names()
    for p in names:
        name, _ = parse_policy(p)
        if name not in policy_names():
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    replicas = parse_replicas(opts.replicas)
    cfg_key = (opts.replicas, opts.event_delay_s, opts.max_loras, opts.max_cpu_loras, opts.cpu_kv_tokens)
    specs = specs_for(opts)
    log(
        f"fleet: {describe_fleet(replicas)}; {len(specs)} workloads x {len(names)} policies; "
        f"{opts.workers} workers"
    )
    info: dict[str, dict[str, Any]] = {}
    tasks: list[Task] = []
    for spec in specs:
        w = build(spec)
        cap = capacity_estimate(w, _cfg(cfg_key, spec.warmup))
        rates = tuple(round(cap * g, 3) for g in GRID)
        info[spec.name] = {
            "spec": spec,
            "workload": w.summary(),
            "description": w.description,
            "slo_ttft_s": w.slo_ttft_s,
            "capacity_estimate_rps": cap,
            "rates": rates,
        }
        info[spec.name]["ceiling"] = upper_bound(
            w, [prof for _, prof in replicas], spec.warmup, cpu_kv_tokens=opts.cpu_kv_tokens
        )
        bisect = 2 if opts.quick else 3
        for seed in opts.seeds:
            sp = replace(spec, seed=seed)
            tasks.extend(Task("search", sp, p, cfg_key, rates=rates, bisect=bisect) for p in names)
    # Long searches first so the two workers finish together.
    tasks.sort(key=lambda t: -t.spec.n)
    searched = execute(tasks, opts.workers, "goodput search")
    results: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in specs}
    by_seed: dict[tuple[str, str], dict[int, float]] = {}
    first_seed = opts.seeds[0]
    for t, out in searched:
        by_seed.setdefault((t.spec.name, t.policy), {})[t.spec.seed] = out["goodput_rps"]
        if t.spec.seed == first_seed:
            results[t.spec.name][t.policy] = dict(out)
    specs = [replace(s, seed=first_seed) for s in specs]

    ref_tasks: list[Task] = []
    for spec in specs:
        res = results[spec.name]
        base = [res[p]["goodput_rate_rps"] for p in names if parse_policy(p)[0] in LOAD_ONLY]
        if not base or max(base) <= 0:
            base = [res[p]["goodput_rate_rps"] for p in names]
        ref = REF_FRACTION * max(base) if base and max(base) > 0 else info[spec.name]["rates"][0]
        info[spec.name]["ref_rate_rps"] = ref
        ref_tasks.extend(Task("ref", spec, p, cfg_key, rate=ref) for p in names)
    ref_tasks.sort(key=lambda t: -t.spec.n)
    for t, out in execute(ref_tasks, opts.workers, "reference rate"):
        r = results[t.spec.name][t.policy]
        for k in (
            *CONTRACT_KEYS[1:],
            "slo_attainment",
            "decide_us_mean",
            "adapter_disk_loads_per_1k",
            "preemptions",
            "ref_saturated",
        ):
            r[k] = out[k]
        r["wall_s"] = r["wall_s"] + out["wall_s"]

    doc: dict[str, Any] = {"workloads": {}, "meta": {}}
    for spec in specs:
        i = info[spec.name]
        pols = {}
        ceil = i["ceiling"]
        for p in names:
            r = results[spec.name][p]
            seeds = by_seed[(spec.name, p)]
            vals = [seeds[k] for k in sorted(seeds)]
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            pols[p] = {
                "goodput_rps": _num(mean),
                "goodput_std_rps": _num(sd),
                "goodput_by_seed": {str(k): _num(seeds[k]) for k in sorted(seeds)},
                "of_ceiling": _num(mean / cg) if 0 < (cg := ceil["goodput_rps"]) < math.inf else None,
                "ttft_p50_s": _num(r["ttft_p50_s"]),
                "ttft_p90_s": _num(r["ttft_p90_s"]),
                "ttft_p99_s": _num(r["ttft_p99_s"]),
                "tpot_p50_s": _num(r["tpot_p50_s"]),
                "prefix_hit_rate": _num(r["prefix_hit_rate"]),
                "adapter_loads_per_1k": _num(r["adapter_loads_per_1k"]),
                "imbalance": _num(r["imbalance"]),
                "index_mode": parse_policy(p)[1],
                "goodput_rate_rps": _num(r["goodput_rate_rps"]),
                "slo_attainment_at_ref": _num(r["slo_attainment"]),
                "saturated_at_ref": bool(r["ref_saturated"]),
                "adapter_disk_loads_per_1k": _num(r["adapter_disk_loads_per_1k"]),
                "preemptions_at_ref": int(r["preemptions"]),
                "decision_us_mean": _num(r["decide_us_mean"]),
                "curve": [
                    {k: _num(v) if isinstance(v, float) else v for k, v in c.items()} for c in r["curve"]
                ],
                "runs": r["runs"] + 1,
                "wall_s": round(r["wall_s"], 2),
            }
        doc["workloads"][spec.name] = {
            "slo_ttft_s": i["slo_ttft_s"],
            "policies": pols,
            "description": i["description"],
            "workload": i["workload"],
            "ref_rate_rps": _num(i["ref_rate_rps"]),
            "rate_grid_rps": list(i["rates"]),
            "capacity_estimate_rps": _num(i["capacity_estimate_rps"]),
            # an infinite goodput ceiling (a run too short to bound: its whole P90 fits in the SLO at the
            # fluid rate) is recorded as null, not as a number
            "ceiling": {k: None if v == math.inf else _num(v) for k, v in ceil.items()},
        }
    doc["meta"] = {
        "command": "corral bench fleet"
        + (" --quick" if opts.quick else "")
        + (f" --seeds {','.join(str(x) for x in opts.seeds)}" if opts.seeds != [0] else "")
        + (f" (CPU KV tier {opts.cpu_kv_tokens} tokens)" if opts.cpu_kv_tokens else ""),
        "quick": opts.quick,
        "replicas": opts.replicas,
        "fleet": describe_fleet(replicas),
        "event_delay_s": opts.event_delay_s,
        "max_loras": opts.max_loras,
        "max_cpu_loras": opts.max_cpu_loras,
        "ref_fraction": REF_FRACTION,
        "seeds": list(opts.seeds),
        "cpu_kv_tokens": opts.cpu_kv_tokens,
        "goodput_quantile": 90,
        "workers": opts.workers,
        "wall_s": round(time.perf_counter() - t_start, 1),
        **provenance(),
    }
    return doc


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return 1e9
    return round(x, 6)


# ---- goals, Markdown, plots ---------------------------------------------------------------------------
def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's benchmark goals, evaluated on this run (absent workloads/policies are skipped)."""
    wl = doc["workloads"]
    out: list[dict[str, Any]] = []

    def pol(w: str, p: str) -> dict[str, Any] | None:
        return wl.get(w, {}).get("policies", {}).get(p)

    def ratio(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return a / b if b > 0 else (math.inf if a > 0 else None)

    def add(goal: str, value: float | None, target: float, higher: bool = True, fmt: str = "{:.2f}x") -> None:
        if value is None:
            return
        met = value >= target if higher else value <= target
        shown = "inf" if math.isinf(value) else fmt.format(value)
        out.append({"goal": goal, "value": value, "shown": shown, "target": target, "met": bool(met)})

    conv = [w for w in wl if w == "conversation"]
    for w in conv:
        c, d, ll = pol(w, "corral"), pol(w, "dualmap"), pol(w, "least_loaded")
        if c and d:
            add(f"{w}: corral goodput / dualmap >= 1.1", ratio(c["goodput_rps"], d["goodput_rps"]), 1.1)
        if c and ll:
            add(f"{w}: corral goodput / least_loaded >= 1.5", ratio(c["goodput_rps"], ll["goodput_rps"]), 1.5)
    for w in ("shared_prefix",):
        c, rr = pol(w, "corral"), pol(w, "round_robin")
        if c:
            add(f"{w}: corral prefix hit rate >= 75%", c["prefix_hit_rate"], 0.75, fmt="{:.1%}")
        if c and rr:
            add(f"{w}: corral goodput / round_robin >= 1.9", ratio(c["goodput_rps"], rr["goodput_rps"]), 1.9)
    if "zero_reuse" in wl:
        c = pol("zero_reuse", "corral")
        lo = [pol("zero_reuse", p) for p in LOAD_ONLY]
        best = max((x["goodput_rps"] for x in lo if x), default=None)
        if c and best:
            add("zero_reuse: corral goodput >= 0.98 x best load-only", c["goodput_rps"] / best, 0.98)
    w = "lora_zipf_128"
    c, ll = pol(w, "corral"), pol(w, "least_loaded")
    if c and ll:
        a, b = c["adapter_loads_per_1k"], ll["adapter_loads_per_1k"]
        if a is not None and b:
            add(f"{w}: corral adapter loads <= 50% of least_loaded", a / b, 0.5, higher=False, fmt="{:.1%}")
        add(f"{w}: least_loaded P99 TTFT / corral >= 5", ratio(ll["ttft_p99_s"], c["ttft_p99_s"]), 5.0)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def to_markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [
        "# Fleet benchmark",
        "",
        f"`{m['command']}` on {m['fleet']} (sim engines, virtual time), event delay "
        f"{m['event_delay_s'] * 1000:.0f} ms, max_loras {m['max_loras']} / max_cpu_loras "
        f"{m['max_cpu_loras']}, "
        + (
            f"CPU KV tier {m['cpu_kv_tokens']} tokens per replica"
            if m.get("cpu_kv_tokens")
            else "no CPU KV tier"
        )
        + f"; {m['wall_s']} s wall on {m['machine']} ({m['workers']} workers), "
        f"{describe(m)}; command line `{' '.join(m.get('argv') or [])}`.",
        "",
        "Goodput: highest arrival rate with P90 TTFT <= SLO (completed req/s). TTFT/TPOT, hit rate, "
        f"adapter loads and imbalance are measured at the reference rate ({m['ref_fraction']} x the best "
        "load-only baseline's goodput, the same for every policy). `*` = the run at the reference rate "
        "was cut short (over half of the requests missed the SLO): its TTFT figures are lower bounds.",
        "",
        f"Seeds {', '.join(str(x) for x in m.get('seeds', [0]))}: goodput is the mean over the seeds' "
        "workloads (± the sample standard deviation when there are several); the other figures come from "
        "the first seed. *Ceiling*: the fleet's caches pooled into one LRU cache (hit rate) and the goodput "
        "of a fluid fleet with that hit rate and perfect balance under the same finite-run P90 criterion "
        "(`corral.bench.bound`); *of ceiling* = goodput / ceiling goodput. The ceiling is an estimate, not a "
        "proof: it charges every output token to the fleet's capacity, and a finite run measured on TTFT can "
        "leave decode work for after its P90 request, so a policy can land slightly above it (over 100%); a "
        "run too short for the fluid queue to reach the SLO at any rate has no finite ceiling (`unbounded`).",
        "",
    ]
    g = goals(doc)
    if g:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---:|:---:|"]
        lines += [f"| {x['goal']} | {x['shown']} | {'yes' if x['met'] else 'no'} |" for x in g]
        lines.append("")
    for name, w in doc["workloads"].items():
        s = w["workload"]
        lines += [
            f"## {name}",
            "",
            f"{w['description']}. {s['requests']} requests, mean prompt {s['prompt_tokens_mean']:.0f} / "
            f"output {s['output_tokens_mean']:.0f} tokens, prefix reuse upper bound "
            f"{s['prefix_reuse_upper_bound']:.1%}. SLO: P90 TTFT <= {w['slo_ttft_s']} s. Reference rate "
            f"{w['ref_rate_rps']:.2f} req/s.",
            "",
            "| policy | goodput (req/s) | of ceiling | TTFT p50 (s) | p90 (s) | p99 (s) | TPOT p50 (ms) | "
            "prefix hit | adapter loads /1k | imbalance |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ceil = w.get("ceiling")
        if ceil:
            bounded = ceil["goodput_rps"] is not None
            lines.append(
                "| **ceiling** (pooled cache, fluid, perfect balance) | "
                + (f"{_f(ceil['goodput_rps'], '{:.2f}')} | 100%" if bounded else "unbounded (short run) | -")
                + f" | - | - | - | - | {_f(ceil['prefix_hit_rate'], '{:.1%}')} | 0.0 | 1.00 |"
            )
        ranked = sorted(w["policies"].items(), key=lambda kv: -(kv[1]["goodput_rps"] or 0))
        for p, r in ranked:
            star = "*" if r["saturated_at_ref"] else ""
            gp = _f(r["goodput_rps"], "{:.2f}")
            if len(r.get("goodput_by_seed") or {}) > 1:
                gp += f" ± {_f(r['goodput_std_rps'], '{:.2f}')}"
            lines.append(
                f"| {p} | {gp} | {_f(r.get('of_ceiling'), '{:.0%}')} | "
                f"{_f(r['ttft_p50_s'], '{:.3f}')}{star} | "
                f"{_f(r['ttft_p90_s'], '{:.3f}')}{star} | {_f(r['ttft_p99_s'], '{:.3f}')}{star} | "
                f"{_f(None if r['tpot_p50_s'] is None else r['tpot_p50_s'] * 1000, '{:.1f}')} | "
                f"{_f(r['prefix_hit_rate'], '{:.1%}')} | {_f(r['adapter_loads_per_1k'], '{:.1f}')} | "
                f"{_f(r['imbalance'], '{:.2f}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    wls = list(doc["workloads"].items())
    pols = sorted({p for _, w in wls for p in w["policies"]})
    cmap = plt.get_cmap("tab10" if len(pols) <= 10 else "tab20")
    color = {p: cmap(k % cmap.N) for k, p in enumerate(pols)}

    cols = min(3, len(wls))
    rows = math.ceil(len(wls) / cols)

    def save_grid(fig: Any, axes: Any, fname: str) -> None:
        """One panel per workload: blank the spare panels, one legend below, save, close."""
        for ax in list(axes.flat)[len(wls) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.12, 1, 1))
        files.append(out / fname)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, w) in zip(axes.flat, wls, strict=False):
        slo = w["slo_ttft_s"]
        for p, r in w["policies"].items():
            pts = [
                (c["rate_rps"], min(c["ttft_p90_s"], slo * 20), c["saturated"])
                for c in r["curve"]
                if c["ttft_p90_s"] is not None
            ]
            if pts:
                xs, ys, cut = zip(*pts, strict=True)
                lw = 2.4 if p.startswith("corral") else 1.2
                ax.plot(xs, ys, marker="o", ms=3, lw=lw, label=p, color=color[p])
                cx = [x for x, c in zip(xs, cut, strict=True) if c]
                cy = [y for y, c in zip(ys, cut, strict=True) if c]
                ax.plot(cx, cy, ls="", marker="o", ms=6, mfc="none", color=color[p])
        ax.axhline(slo, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{name} (SLO {slo:g}s; hollow = run cut short, lower bound)", fontsize=9)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("P90 TTFT (s)")
        ax.grid(alpha=0.3)
    save_grid(fig, axes, "fleet_ttft_vs_rate.png")

    # Goodput vs arrival rate (requests meeting the SLO per second) with the ceiling.
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, w) in zip(axes.flat, wls, strict=False):
        for p, r in w["policies"].items():
            gpts = sorted(
                (c["rate_rps"], c["rate_rps"] * c["slo_attainment"])
                for c in r["curve"]
                if c.get("slo_attainment") is not None
            )
            if gpts:
                gx, gy = zip(*gpts, strict=True)
                lw = 2.4 if p.startswith("corral") else 1.2
                ax.plot(gx, gy, marker="o", ms=3, lw=lw, label=p, color=color[p])
        ceil = (w.get("ceiling") or {}).get("goodput_rps")
        if ceil:
            ax.axhline(ceil, color="k", ls="--", lw=0.8, label="ceiling")
        ax.set_title(f"{name}: goodput vs rate (dashed: ceiling)", fontsize=9)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("req/s meeting the TTFT SLO")
        ax.grid(alpha=0.3)
    save_grid(fig, axes, "fleet_goodput_vs_rate.png")

    # Distance from the ceiling: goodput / ceiling goodput per workload and policy (error bar: seed std).
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(wls) * len(pols) / 5), 4.0))
    width = 0.8 / len(pols)
    for k, p in enumerate(pols):
        bx: list[float] = []
        by: list[float] = []
        be: list[float] = []
        for i, (_, w) in enumerate(wls):
            r = w["policies"].get(p)
            c = (w.get("ceiling") or {}).get("goodput_rps")
            if r is None or not c or r.get("of_ceiling") is None:
                continue
            bx.append(i + k * width)
            by.append(100 * r["of_ceiling"])
            be.append(100 * (r.get("goodput_std_rps") or 0.0) / c)
        edge = "k" if p.startswith("corral") else None
        ax.bar(bx, by, width, yerr=be, label=p, color=color[p], edgecolor=edge)
    ax.axhline(100, color="k", ls="--", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(wls))])
    ax.set_xticklabels([n for n, _ in wls], fontsize=8)
    ax.set_ylabel("goodput, % of the ceiling")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(out / "fleet_of_ceiling.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    def bars(metric: str, fname: str, ylabel: str, only: list[str] | None = None, pct: bool = False) -> None:
        sel = [(n, w) for n, w in wls if only is None or n in only]
        if not sel:
            return
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(sel) * len(pols) / 5), 4.0))
        width = 0.8 / len(pols)
        for k, p in enumerate(pols):
            xs = [i + k * width for i in range(len(sel))]
            ys = [(w["policies"].get(p, {}).get(metric) or 0.0) * (100 if pct else 1) for _, w in sel]
            ax.bar(xs, ys, width, label=p, color=color[p], edgecolor="k" if p.startswith("corral") else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))])
        ax.set_xticklabels([n for n, _ in sel], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        files.append(out / fname)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    bars("prefix_hit_rate", "fleet_prefix_hit.png", "prefix-cache hit rate (% of prompt tokens)", pct=True)
    lora = [n for n, w in wls if w["workload"].get("adapters")]
    bars("adapter_loads_per_1k", "fleet_adapter_loads.png", "adapter loads per 1k requests", only=lora)
    bars("goodput_rps", "fleet_goodput.png", "goodput (req/s, P90 TTFT <= SLO)")
    return files


def write(doc: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "fleet.json", out / "fleet.md"]
    files[0].write_text(json.dumps(doc, indent=1) + "\n")
    files[1].write_text(to_markdown(doc) + "\n")
    if plots:
        files += plot(doc, out)
    return files


def validate(doc: dict[str, Any]) -> None:
    """Check the fleet.json contract (``CONTRACT_KEYS`` per policy; raises AssertionError)."""
    assert isinstance(doc.get("workloads"), dict) and doc["workloads"], "no workloads"
    for name, w in doc["workloads"].items():
        assert isinstance(w.get("slo_ttft_s"), float), f"{name}: slo_ttft_s"
        assert isinstance(w.get("policies"), dict) and w["policies"], f"{name}: policies"
        for p, r in w["policies"].items():
            for k in CONTRACT_KEYS:
                assert k in r, f"{name}/{p}: missing {k}"
                assert r[k] is None or isinstance(r[k], float), f"{name}/{p}: {k} not a float"


def _kv_bytes_per_token(replicas: str) -> int:
    """KV bytes per token of the fleet's model (the largest over its GPU classes' profiles)."""
    try:
        return max(p.kv_bytes_per_token for _, p in parse_replicas(replicas))
    except ValueError:
        return 131072  # a bad --replicas is reported by run()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller suite and requests (< 1 minute)")
    ap.add_argument(
        "--trace", type=Path, nargs="+", default=[], metavar="FILE", help="Mooncake JSONL / Azure CSV"
    )
    ap.add_argument("--policies", default="", help="comma-separated (default: all); NAME@precise|approximate")
    ap.add_argument(
        "--replicas", default=DEFAULT_REPLICAS, help=f"GPU:COUNT,... (default {DEFAULT_REPLICAS})"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--event-delay", type=float, default=0.05, help="engine event delay to the router, s")
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-cpu-loras", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="requests per workload (override)")
    ap.add_argument("--workloads", default="", help="comma-separated subset of the default suite")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--seeds", default="0", help="comma-separated workload seeds (default 0)")
    ap.add_argument(
        "--cpu-kv-gib",
        type=float,
        default=0.0,
        help="CPU KV tier per replica, GiB of host memory (vLLM CPU offloading / LMCache; default 0: none)",
    )
    a = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()] or [0]
    except ValueError:
        msg = f"corral bench fleet: --seeds: expected comma-separated integers, got {a.seeds!r}"
        print(msg, file=sys.stderr)
        return 2
    opts = Options(
        quick=a.quick,
        traces=list(a.trace),
        policies=[p.strip() for p in a.policies.split(",") if p.strip()],
        replicas=a.replicas,
        out=a.out,
        workers=max(1, a.workers),
        event_delay_s=a.event_delay,
        max_loras=a.max_loras,
        max_cpu_loras=a.max_cpu_loras,
        requests=a.requests,
        workloads=[x.strip() for x in a.workloads.split(",") if x.strip()],
        plots=not a.no_plots,
        seeds=seeds,
        cpu_kv_tokens=int(a.cpu_kv_gib * 2**30) // _kv_bytes_per_token(a.replicas),
    )
    try:
        doc = run(opts, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"corral bench fleet: {e}", file=sys.stderr)
        return 2
    validate(doc)
    files = write(doc, opts.out, opts.plots)
    print(to_markdown(doc))
    print("\nwrote " + ", ".join(_rel(f) for f in files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
