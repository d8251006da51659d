"""``corral bench``: run the benchmarks of ``bench/`` (``fleet``, ``router``, ``overhead``).

The benchmark scripts live in the source tree's ``bench/`` folder (they are not part of the wheel); this
command finds that folder next to the installed source roots (an editable install or a checkout) or via
``$CORRAL_BENCH_DIR``, loads the script and calls its ``main(argv)`` with the remaining arguments::

    corral bench fleet --quick
    corral bench router --quick --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BENCHES = {
    "fleet": ("fleet.py", "fleet benchmark: trace replay through sim replicas, every policy"),
    "router": ("router_micro.py", "router micro-benchmark: decision latency per policy, hashing cost"),
    "overhead": ("router_overhead.py", "router overhead: direct vs through the router (gRPC/HTTP)"),
}


def bench_dir() -> Path | None:
    env = os.environ.get("CORRAL_BENCH_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "bench" / "fleet.py").exists():
            return parent / "bench"
    return None


def load(name: str) -> ModuleType:
    d = bench_dir()
    if d is None:
        raise FileNotFoundError(
            "the benchmark scripts (bench/) were not found: run from a Corral checkout or an editable "
            "install, or set CORRAL_BENCH_DIR"
        )
    path = d / BENCHES[name][0]
    if not path.exists():
        raise FileNotFoundError(f"benchmark script not found: {path}")
    mod_name = f"corral_bench_{name}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # worker processes (multiprocessing) resolve its functions by name
    spec.loader.exec_module(mod)
    return mod


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="Run the router and fleet benchmarks.",
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
    except FileNotFoundError as e:
        print(f"corral bench: {e}", file=sys.stderr)
        return 2
    return int(mod.main(list(args.args)) or 0)
