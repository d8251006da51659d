"""``corral version``: print the installed Corral version and the CRD API version."""

from __future__ import annotations

import argparse
from importlib import metadata

from ..common import API_VERSION


def version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("version", help="Print the Corral and API versions.")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    print(f"corral {version()} (API {API_VERSION})")
    return 0
