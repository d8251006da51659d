"""Offline validation of Corral custom resources (the engine behind ``corral validate``).

This module owns turning YAML files into :class:`Problem` lines: YAML syntax errors (with line), unknown
``apiVersion``/``kind``, and every schema or rule violation the pydantic models report, rendered with a
Kubernetes-style field path (``spec.gpuClasses[1].maxReplicas``) and, where the apiserver has a fixed
phrase for the same failure (``Unsupported value``, ``should be greater than or equal to``), the same words.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .common import API_VERSION, GROUP, RULE_ERROR_TYPE
from .models import KINDS, ModelPool, RoutingPolicy

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Problem:
    """One validation error: ``file: Kind/name: path: message`` (``file:line: message`` for YAML errors)."""

    file: str
    message: str
    obj: str = ""
    path: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(p for p in (where, self.obj, self.path, self.message) if p)


@dataclass
class Report:
    """Result of validating some files."""

    problems: list[Problem] = field(default_factory=list)
    objects: list[ModelPool | RoutingPolicy] = field(default_factory=list)
    files: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.problems:
            return f"{len(self.problems)} error(s) in {self.files} file(s)"
        kinds = Counter(o.kind for o in self.objects)
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "no objects"
        skipped = f", {self.skipped} foreign skipped" if self.skipped else ""
        return f"OK: {len(self.objects)} object(s) in {self.files} file(s) ({detail}{skipped})"


# ------------------------------------------------------------------------------------ error rendering


def format_loc(loc: Iterable[str | int]) -> str:
    """``('spec', 'gpuClasses', 1, 'maxReplicas')`` -> ``spec.gpuClasses[1].maxReplicas``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def join_path(base: str, rel: str) -> str:
    """Append a rule's relative path (``.cpuSlots``, ``[2].name``) to ``base``."""
    if not rel:
        return base
    if not base:
        return rel.lstrip(".")
    return base + rel if rel[0] in ".[" else f"{base}.{rel}"


def _got(value: Any) -> str:
    if isinstance(value, dict | list):
        return ""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return f" (got {text[:80]})"


def _expected_values(expected: str) -> list[str]:
    return [q or n for q, n in re.findall(r"'((?:[^'\\]|\\.)*)'|(-?\d+(?:\.\d+)?)", expected)]


def error_lines(exc: ValidationError) -> list[tuple[str, str]]:
    """Flatten a pydantic error into ``(field path, message)`` pairs in Kubernetes wording."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        path = format_loc(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        inp = err.get("input")
        if kind == RULE_ERROR_TYPE:
            out.extend((join_path(path, rel), msg) for rel, msg in ctx["issues"])
        elif kind == "extra_forbidden":
            out.append((path, "unknown field"))
        elif kind == "missing":
            out.append((path, "Required value"))
        elif kind == "literal_error":
            values = ", ".join(f'"{v}"' for v in _expected_values(str(ctx.get("expected", ""))))
            out.append((path, f"Unsupported value: {json.dumps(inp)}: supported values: {values}"))
        elif kind == "string_pattern_mismatch":
            out.append((path, f"should match '{ctx.get('pattern')}'{_got(inp)}"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msg = re.sub(r"^(Input|String|List|Dictionary|Value) should", "should", msg)
            out.append((path, msg + _got(inp)))
    return out


# ----------------------------------------------------------------------------------------- documents


def _label(doc: dict[str, Any], index: int) -> str:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if isinstance(kind, str) and isinstance(name, str) and name:
        return f"{kind}/{name}"
    if isinstance(kind, str):
        return f"{kind}/<document {index}>"
    return f"<document {index}>"


def validate_document(
    doc: Any, file: str, index: int, *, skip_foreign: bool = False
) -> tuple[ModelPool | RoutingPolicy | None, list[Problem]]:
    """Validate one parsed YAML document; returns the model (if valid) and the problems found.

    With ``skip_foreign``, objects of other API groups are ignored (returned as ``(None, [])``).
    """
    if not isinstance(doc, dict):
        return None, [Problem(file, f"expected a mapping, got {type(doc).__name__}", f"<document {index}>")]
    label = _label(doc, index)
    api_version = doc.get("apiVersion")
    kind = doc.get("kind")
    if skip_foreign and not (isinstance(api_version, str) and api_version.startswith(f"{GROUP}/")):
        return None, []
    problems: list[Problem] = []
    if api_version is None:
        problems.append(Problem(file, "Required value", label, "apiVersion"))
    elif api_version != API_VERSION:
        problems.append(
            Problem(file, f'unknown apiVersion "{api_version}" (expected {API_VERSION})', label, "apiVersion")
        )
    if kind is None:
        problems.append(Problem(file, "Required value", label, "kind"))
    elif kind not in KINDS:
        known = " or ".join(KINDS)
        problems.append(Problem(file, f'unknown kind "{kind}" (expected {known})', label, "kind"))
    if problems or not isinstance(kind, str):
        return None, problems
    try:
        obj = KINDS[kind].model_validate(doc)
    except ValidationError as exc:
        return None, [Problem(file, msg, label, path) for path, msg in error_lines(exc)]
    return obj, []


def _load_all(text: str) -> Iterator[Any]:
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_data():
            yield loader.get_data()
    finally:
        loader.dispose()


def validate_text(
    text: str, file: str = "<stdin>", *, skip_foreign: bool = False, report: Report | None = None
) -> Report:
    """Validate every document of a (multi-document) YAML text, adding to ``report``."""
    report = report if report is not None else Report()
    report.files += 1
    index = 0
    try:
        for doc in _load_all(text):
            index += 1
            if doc is None:
                continue
            obj, problems = validate_document(doc, file, index, skip_foreign=skip_foreign)
            report.problems.extend(problems)
            if obj is not None:
                report.objects.append(obj)
            elif not problems:
                report.skipped += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        report.problems.append(Problem(file, f"YAML syntax error: {problem}", line=line))
    return report


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Files to validate: given files as is, directories searched recursively for *.yaml / *.yml."""
    files: list[Path] = []
    problems: list[Problem] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in YAML_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            problems.append(Problem(str(p), "no such file or directory"))
    return files, problems


def validate_paths(paths: Sequence[str | Path], *, skip_foreign: bool = False) -> Report:
    """Validate files and directories (see :func:`expand_paths`)."""
    files, problems = expand_paths(paths)
    report = Report(problems=problems)
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.files += 1
            report.problems.append(Problem(str(f), f"cannot read: {exc}"))
            continue
        validate_text(text, str(f), skip_foreign=skip_foreign, report=report)
    return report
