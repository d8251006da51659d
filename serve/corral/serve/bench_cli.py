"""``corral bench``: run the benchmarks of :mod:`corral.bench` (``fleet``, ``router``, ``overhead``).

The benchmarks are modules of the installed package (they ship in the wheel with their data), imported by
name so that their worker processes (``multiprocessing`` spawn) can import them too. Each one's
``main(argv)`` gets the remaining arguments and writes to ``--out`` (default ``./corral-bench/``)::

    corral bench fleet --quick
    corral bench router --quick --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

BENCHES = {
    "fleet": ("corral.bench.fleet", "fleet benchmark: trace replay through sim replicas, every policy"),
    "router": ("corral.bench.router_micro", "router micro-benchmark: decision latency per policy, hashing"),
    "overhead": ("corral.bench.router_overhead", "router overhead: direct vs through the router (gRPC/HTTP)"),
    "ablation": ("corral.bench.ablation", "corral policy ablation: goodput with one mechanism off at a time"),
    "peers": ("corral.bench.peers", "Corral vs sglang-router, vllm-router on the same fake vLLM workers"),
    "recovery": ("corral.bench.recovery", "recovery: engine killed or stalled, router restarted (processes)"),
    "load": ("corral.bench.load", "overload: admission control at 2x capacity (rejected, lost, fairness)"),
    "select": ("corral.bench.select", "model selection: rules and bandits vs random, largest; regret; cost"),
    "security": ("corral.bench.security", "security: API key check, key reload delay, TLS latency cost"),
}


def load(name: str) -> ModuleType:
    """The benchmark module ``name`` (a key of :data:`BENCHES`)."""
    return importlib.import_module(BENCHES[name][0])


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="Run the router and fleet benchmarks (results in ./corral-bench/ unless --out DIR).",
        description="\n".join(f"  {k:9s} {v[1]}" for k, v in BENCHES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its options (see corral bench NAME --help)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        mod = load(args.which)
    except ImportError as e:
        print(f"corral bench: cannot import the benchmark {BENCHES[args.which][0]}: {e}", file=sys.stderr)
        return 2
    return int(mod.main(list(args.args)) or 0)
