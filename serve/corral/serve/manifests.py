"""Read ModelPool / RoutingPolicy manifests for local mode, exactly as ``corral validate`` reads them.

Files and folders go through :func:`corral.api.validation.validate_paths` (folders searched recursively
for ``*.yaml`` / ``*.yml``, multi-document files, the CRDs' rules), so ``corral serve`` / ``corral demo``
accept what ``corral validate`` accepts and refuse the rest with the same one-line messages. Each valid
ModelPool is paired with its RoutingPolicy (``spec.poolRef`` naming the pool, or the pool's
``spec.routingPolicyRef`` naming the policy) and both are returned as CR dicts (camelCase, defaults
applied), the shape :func:`corral.serve.app.plan_pool` takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corral.api.validation import Problem, validate_paths

Manifest = dict[str, Any]


class ManifestError(ValueError):
    """The manifests cannot be served: ``problems`` holds one line per error (``corral validate``'s)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


def _lines(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]


def load_manifests(paths: Iterable[str | Path]) -> list[tuple[Manifest, Manifest | None]]:
    """(ModelPool, its RoutingPolicy or None) pairs from YAML files or folders.

    Raises :class:`ManifestError` for a missing path, a YAML syntax error, an invalid object or when no
    ModelPool is found (an empty folder).
    """
    paths = [Path(p) for p in paths]
    report = validate_paths(paths)
    if not report.ok:
        lines = _lines(report.problems)
        more = ""
        if len(lines) > 1:
            more = f" (and {len(lines) - 1} more; run `corral validate` on the same paths)"
        raise ManifestError(lines[0] + more, lines)
    docs = [o.model_dump(by_alias=True, mode="json", exclude_none=True) for o in report.objects]
    pools = [d for d in docs if d["kind"] == "ModelPool"]
    policies = [d for d in docs if d["kind"] == "RoutingPolicy"]
    if not pools:
        where = ", ".join(map(str, paths))
        found = f"{report.files} YAML file(s)" if report.files else "no *.yaml / *.yml file"
        raise ManifestError(f"{where}: no ModelPool found ({found})")
    out = []
    for p in pools:
        name = p["metadata"]["name"]
        ref = (p.get("spec") or {}).get("routingPolicyRef")
        match = [
            r
            for r in policies
            if (r.get("spec") or {}).get("poolRef") == name or (ref and r["metadata"]["name"] == ref)
        ]
        out.append((p, match[0] if match else None))
    return out
