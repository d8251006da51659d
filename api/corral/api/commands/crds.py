"""``corral crds``: write the CRDs generated from the models, or ``--check`` the committed ones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import crdgen


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "crds",
        help="Generate the CRDs from the models (or --check them).",
        description="Generate structural CRDs (with CEL rules) from the pydantic models.",
    )
    p.add_argument(
        "--out", type=Path, default=crdgen.DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 and show a diff if the files are stale"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.check:
        diffs = crdgen.check(args.out)
        for d in diffs:
            sys.stdout.write(d)
        if diffs:
            print(f"CRDs in {args.out} are out of date: run `corral crds --out {args.out}`", file=sys.stderr)
            return 1
        print(f"CRDs in {args.out} are up to date")
        return 0
    for path in crdgen.write(args.out):
        print(f"wrote {path}")
    return 0
