"""corral.bench: the benchmarks behind ``corral bench`` (fleet, router micro-benchmark, router overhead).

Each module has a ``main(argv)`` and writes its results to ``--out`` (default ``./corral-bench/``, in the
current directory). The committed results in ``docs/benchmarks/`` are written by passing
``--out docs/benchmarks`` from a checkout (``make bench-docs``). ``data/`` ships a sample of the Mooncake
conversation trace, so the default fleet suite runs from an installed wheel too.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_OUT = Path("corral-bench")


def checkout_root() -> Path | None:
    """The source checkout this package lives in (``<root>/bench/corral/bench``), or None for a wheel."""
    root = Path(__file__).resolve().parents[3]
    in_checkout = (root / "pyproject.toml").exists() and (root / "bench" / "corral" / "bench").is_dir()
    return root if in_checkout else None
