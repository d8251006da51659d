#!/usr/bin/env python3
"""Run the hostile-input suite (tests/unit/test_fuzz_*.py) at a larger budget and record what was tried.

CI runs the same tests at scale 1 (seconds). This script runs them with ``CORRAL_FUZZ_SCALE`` (every
hypothesis test's example count multiplied; inputs drawn afresh instead of CI's fixed ones) and
``CORRAL_FUZZ_STREAMS`` concurrent streams dropped mid-way, collects the count of inputs each test sent
(``CORRAL_FUZZ_COUNTS``), and writes

* ``docs/benchmarks/fuzz.json``: counts per group, total, pytest outcome, wall time, provenance;
* the block between ``<!-- fuzz-report:begin -->`` and ``<!-- fuzz-report:end -->`` in
  ``docs/reliability.md`` (a table of the counts).

Usage: ``.venv/bin/python scripts/fuzz_report.py [--scale 5] [--streams 2000]``. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.bench.provenance import describe, provenance

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- fuzz-report:begin -->", "<!-- fuzz-report:end -->"
TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "unit").glob("test_fuzz_*.py"))


def run(scale: int, streams: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = Path(tmp) / "counts.json"
        env = {
            **os.environ,
            "CORRAL_FUZZ_SCALE": str(scale),
            "CORRAL_FUZZ_STREAMS": str(streams),
            "CORRAL_FUZZ_COUNTS": str(counts_file),
        }
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.monotonic() - t0
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    outcome = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors)", tail)}
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-8000:] + proc.stderr[-4000:])
    return {
        "meta": provenance(),
        "scale": scale,
        "streams": streams,
        "tests": TESTS,
        "counts": counts,
        "total_inputs": sum(counts.values()),
        "pytest": {"returncode": proc.returncode, **outcome, "summary": tail},
        "wall_s": round(wall, 1),
    }


def section(res: dict[str, object]) -> str:
    counts: dict[str, int] = res["counts"]  # type: ignore[assignment]
    py: dict[str, object] = res["pytest"]  # type: ignore[assignment]
    lines = [
        BEGIN,
        f"Inputs tried by `scripts/fuzz_report.py --scale {res['scale']} --streams {res['streams']}` "
        f"({describe(res['meta'])}; {py.get('passed', 0)} tests passed, {py.get('failed', 0)} failed, "  # type: ignore[arg-type]
        f"{res['wall_s']} s on {res['meta']['machine']}; results in `docs/benchmarks/fuzz.json`). "  # type: ignore[index]
        "Every one got a precise 4xx / INVALID_ARGUMENT, a 200, or a clean close; no 500, no leaked slot.",
        "",
        "| inputs | tried |",
        "|---|---:|",
        *(f"| {k} | {v:,} |" for k, v in sorted(counts.items())),
        f"| **total** | **{res['total_inputs']:,}** |",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=5, help="multiplier of every fuzz test's example count")
    ap.add_argument("--streams", type=int, default=2000, help="concurrent SSE streams dropped mid-way")
    ap.add_argument("--out", default="docs/benchmarks/fuzz.json")
    ap.add_argument("--doc", default="docs/reliability.md", help="'' to leave the doc alone")
    args = ap.parse_args()
    res = run(args.scale, args.streams)
    out = ROOT / args.out
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['total_inputs']} inputs, pytest: {res['pytest']['summary']} -> {args.out}")  # type: ignore[index]
    if args.doc:
        doc = ROOT / args.doc
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            print(f"{args.doc}: no {BEGIN} ... {END} block to fill", file=sys.stderr)
            return 2
        i, j = text.index(BEGIN), text.index(END) + len(END)
        doc.write_text(text[:i] + section(res) + text[j:])
        print(f"updated {args.doc}")
    return int(res["pytest"]["returncode"])  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
