"""Summary of the routing results across the fleet benchmark's committed runs (no simulation here).

    python -m corral.bench.routing_summary [DIR]     (default docs/benchmarks)

Reads ``DIR/fleet.json`` (the suite), and when present ``DIR/seeds/fleet.json`` (the same suite on more
workload seeds), ``DIR/heldout/fleet.json`` (traces corral was not developed on) and
``DIR/cpu_tier/fleet.json`` (the suite's workloads with a CPU KV tier), and writes
``DIR/routing_summary.md``: per workload corral's goodput against the best other policy (with the seed
spread), the ceiling and each one's share of it, P99 TTFT at the reference rate, and goodput with and
without the CPU KV tier. Every number is copied from those files.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def _best_other(pols: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    others = {p: r for p, r in pols.items() if not p.startswith("corral")}
    name = max(others, key=lambda p: others[p]["goodput_rps"] or 0.0)
    return name, others[name]


def _seed_stats(
    name: str, policy: str, main: dict[str, Any], seeds: dict[str, Any] | None
) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the goodput over seed 0 (main run) and the seeds run's seeds."""
    vals = [main["workloads"][name]["policies"][policy]["goodput_rps"]]
    if seeds is not None and name in seeds["workloads"] and policy in seeds["workloads"][name]["policies"]:
        by = seeds["workloads"][name]["policies"][policy].get("goodput_by_seed") or {}
        vals += [v for k, v in by.items() if k != "0" and v is not None]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, sd, len(vals)


def _table(doc: dict[str, Any], seeds: dict[str, Any] | None, title: str) -> list[str]:
    lines = [
        f"## {title}",
        "",
        f"From `{doc['meta'].get('command', '')}` at git `{str(doc['meta'].get('git') or '')[:12]}`"
        + (" (dirty)" if doc["meta"].get("dirty") else "")
        + ".",
        "",
        "| workload | corral goodput | best other | its goodput | corral / best | ceiling "
        "| corral of ceiling | best other of ceiling | P99 TTFT corral / best other (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, w in doc["workloads"].items():
        pols = w["policies"]
        if "corral" not in pols or len(pols) < 2:
            continue
        c = pols["corral"]
        bo_name, bo = _best_other(pols)
        cm, csd, cn = _seed_stats(name, "corral", doc, seeds)
        bm, bsd, bn = _seed_stats(name, bo_name, doc, seeds)
        ceil = (w.get("ceiling") or {}).get("goodput_rps")
        cg = f"{_f(cm, '{:.2f}')}" + (f" ± {csd:.2f} (n={cn})" if csd is not None else "")
        bg = f"{_f(bm, '{:.2f}')}" + (f" ± {bsd:.2f} (n={bn})" if bsd is not None else "")
        ratio = cm / bm if cm is not None and bm else None
        lines.append(
            f"| {name} | {cg} | {bo_name} | {bg} | {_f(ratio, '{:.2f}x')} | {_f(ceil, '{:.1f}')} | "
            f"{_f(cm / ceil if cm is not None and ceil else None, '{:.0%}')} | "
            f"{_f(bm / ceil if bm is not None and ceil else None, '{:.0%}')} | "
            f"{_f(c['ttft_p99_s'], '{:.3f}')} / {_f(bo['ttft_p99_s'], '{:.3f}')} |"
        )
    lines.append("")
    return lines


def _cpu_table(main: dict[str, Any], cpu: dict[str, Any]) -> list[str]:
    lines = [
        "## With and without the CPU KV tier",
        "",
        f"With: `{cpu['meta'].get('command', '')}` ({cpu['meta'].get('cpu_kv_tokens')} tokens of host KV per "
        "replica); without: the suite run above (same workloads, seeds and fleet).",
        "",
        "| workload | policy | goodput without | goodput with | change | prefix hit without | with |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, w in cpu["workloads"].items():
        base = main["workloads"].get(name, {}).get("policies", {})
        for p, r in sorted(w["policies"].items(), key=lambda kv: -(kv[1]["goodput_rps"] or 0)):
            b = base.get(p)
            g0 = b["goodput_rps"] if b else None
            g1 = r["goodput_rps"]
            ch = (g1 / g0 - 1) if g0 and g1 is not None else None
            lines.append(
                f"| {name} | {p} | {_f(g0, '{:.2f}')} | {_f(g1, '{:.2f}')} | {_f(ch, '{:+.0%}')} | "
                f"{_f(b['prefix_hit_rate'] if b else None, '{:.1%}')} | "
                f"{_f(r['prefix_hit_rate'], '{:.1%}')} |"
            )
    lines.append("")
    return lines


def summarize(d: Path) -> str:
    main = _load(d / "fleet.json")
    if main is None:
        raise FileNotFoundError(f"no {d / 'fleet.json'}: run `corral bench fleet --out {d}` first")
    seeds = _load(d / "seeds" / "fleet.json")
    held = _load(d / "heldout" / "fleet.json")
    cpu = _load(d / "cpu_tier" / "fleet.json")
    lines = [
        "# Routing results summary",
        "",
        "Generated by `python -m corral.bench.routing_summary` from the committed results next to this file "
        "(see `routing.md` for what they mean). Goodput in req/s; `±` is the sample standard deviation over "
        "the workload seeds (seed 0 from the suite run, seeds 1 and 2 from `seeds/`) where both policies "
        "were run on them.",
        "",
    ]
    lines += _table(main, seeds, "Suite")
    if held is not None:
        lines += _table(held, None, "Held-out traces")
    if cpu is not None:
        lines += _cpu_table(main, cpu)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    d = Path(args[0]) if args else Path("docs/benchmarks")
    try:
        text = summarize(d)
    except FileNotFoundError as e:
        print(f"routing_summary: {e}", file=sys.stderr)
        return 2
    (d / "routing_summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
