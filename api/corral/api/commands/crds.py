"""``corral crds``: print the CRDs generated from the models, write them (``--out DIR``), or ``--check``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import crdgen


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "crds",
        help="Print the CRDs (--out DIR writes them, --check compares).",
        description="Generate structural CRDs (with CEL rules) from the pydantic models. Without --out they "
        "are printed to stdout as one multi-document YAML stream (`corral crds | kubectl apply -f -`).",
    )
    p.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help=f"write one file per CRD into DIR (the repository's are in {crdgen.DEFAULT_OUT})",
    )  # fmt: skip
    p.add_argument(
        "--check", action="store_true",
        help=f"write nothing; exit 1 and show a diff if the files in --out (default {crdgen.DEFAULT_OUT}) "
        "are stale",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.check:
        out = args.out or crdgen.DEFAULT_OUT
        if not out.is_dir():
            print(
                f"corral crds --check: {out}: no such directory (give the CRD folder with --out DIR)",
                file=sys.stderr,
            )
            return 2
        diffs = crdgen.check(out)
        for d in diffs:
            sys.stdout.write(d)
        if diffs:
            print(f"CRDs in {out} are out of date: run `corral crds --out {out}`", file=sys.stderr)
            return 1
        print(f"CRDs in {out} are up to date")
        return 0
    if args.out is None:
        sys.stdout.write("---\n".join(crdgen.render_all().values()))
        return 0
    for path in crdgen.write(args.out):
        print(f"wrote {path}")
    return 0
