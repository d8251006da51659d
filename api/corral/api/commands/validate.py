"""``corral validate FILE|DIR...``: check Corral custom resources offline with the CRDs' rules."""

from __future__ import annotations

import argparse
import sys

from ..validation import Report, cross_check, validate_paths, validate_text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="Validate Corral custom resources offline.",
        description=(
            "Validate ModelPool and RoutingPolicy YAML (multi-document files, directories searched "
            "recursively for *.yaml/*.yml, '-' for stdin) with the same rules as the CRDs, and the objects "
            "given together against each other (a RoutingPolicy's pins against its ModelPool's adapters, "
            "one policy per pool). Prints 'file: Kind/name: field.path: message' per error. Exit code 0: "
            "all valid; 1: any error (also a missing path or a folder without YAML files)."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="files or directories to validate")
    p.add_argument(
        "--skip-foreign",
        action="store_true",
        help="ignore objects of other API groups (e.g. a Secret beside the CRs) instead of failing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only, no summary")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    files = [p for p in args.paths if p != "-"]
    report: Report = Report()
    if files:
        report = validate_paths(files, skip_foreign=args.skip_foreign, cross=False)
    if "-" in args.paths:
        validate_text(sys.stdin.read(), "<stdin>", skip_foreign=args.skip_foreign, report=report)
    cross_check(report)
    for problem in report.problems:
        print(problem)
    if not args.quiet and report.files:  # nothing read (missing path, empty folder): its one line says it
        print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
