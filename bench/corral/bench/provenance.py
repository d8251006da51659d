"""Where a benchmark result came from: git revision, dirty flag, command line, machine.

Every results file written by ``corral bench`` carries :func:`provenance` under ``meta``, so a number can
be traced to the exact code that produced it (``dirty: true`` means uncommitted changes were present).
Outside a git checkout (an installed wheel) ``git`` is ``""`` and ``dirty`` is ``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from corral.bench import checkout_root


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: Path | None = None) -> tuple[str, bool | None]:
    """(short revision, dirty) of the checkout this package runs from; ("", None) outside one."""
    root = root or checkout_root()
    if root is None:
        return "", None
    rev = _git(["rev-parse", "--short=12", "HEAD"], root)
    if rev is None:
        return "", None
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return rev.strip(), (bool(status.strip()) if status is not None else None)


def _portable(arg: str) -> str:
    """An absolute path argument as its last component (no machine-specific path in a results file)."""
    return Path(arg).name if os.path.isabs(arg) else arg


def describe(meta: dict[str, Any]) -> str:
    """``git `abc123` `` / ``git `abc123` (dirty)`` / ``no git checkout`` for a results file's header."""
    if not meta.get("git"):
        return "no git checkout (an installed package)"
    return f"git `{meta['git']}`" + (" (dirty: uncommitted changes)" if meta.get("dirty") else "")


def provenance() -> dict[str, Any]:
    """The ``meta`` block every results file carries."""
    rev, dirty = git_state()
    return {
        "git": rev,
        "dirty": dirty,
        "argv": [Path(sys.argv[0]).name, *map(_portable, sys.argv[1:])],  # e.g. corral bench fleet --quick
        "python": platform.python_version(),
        "machine": f"{platform.machine()} x{os.cpu_count()}",
    }
