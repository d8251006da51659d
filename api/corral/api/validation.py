"""Offline validation of Corral custom resources (the engine behind ``corral validate``).

This module owns turning YAML files into :class:`Problem` lines: YAML syntax errors (with line), unknown
``apiVersion``/``kind``, and every schema or rule violation the pydantic models report, rendered with a
Kubernetes-style field path (``spec.gpuClasses[1].maxReplicas``) and, where the apiserver has a fixed
phrase for the same failure (``Unsupported value``, ``should be greater than or equal to``, ``must be of
type integer``, ``Duplicate value``), the same words.

The verdict (valid or not) is meant to be the apiserver's for the same file applied with kubectl
(``fieldValidation=Strict``); ``tests/integration/test_k8s_parity.py`` checks that on every fixture. So the
YAML is read as kubectl reads it: timestamps stay strings, a repeated key is an error, and nesting deeper
than any Corral schema (:data:`MAX_DEPTH`) is reported with its path instead of overflowing the stack.
On top of the per-object checks, :func:`cross_check` checks the objects given together against each other
(a RoutingPolicy's pins against its ModelPool's adapters, one policy per pool); the operator's admission
webhook runs the same checks against the objects stored in the cluster (:func:`admission_problems`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .common import API_VERSION, GROUP, NOT_FINITE, RULE_ERROR_TYPE
from .models import KINDS, ModelPool, RoutingPolicy
from .selection import pool_issues, selection_lint

YAML_SUFFIXES = (".yaml", ".yml")
MAX_DEPTH = 64
"""Deepest nesting of mappings/sequences accepted in a document (Corral's schemas need fewer than 10)."""


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
    sources: list[str] = field(default_factory=list)
    """File of each of :attr:`objects` (same order)."""
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
        out = f"OK: {len(self.objects)} object(s) in {self.files} file(s) ({detail}{skipped})"
        pools = {(o.metadata.namespace, o.metadata.name) for o in self.objects if isinstance(o, ModelPool)}
        alone = sorted(
            o.spec.pool_ref
            for o in self.objects
            if isinstance(o, RoutingPolicy) and (o.metadata.namespace, o.spec.pool_ref) not in pools
        )
        if alone:
            out += (
                f"; not checked against their pools (pins, selection targets, private adapters): ModelPool "
                f"{', '.join(repr(n) for n in alone)} not given: validate the policy together with its pool"
            )
        return out


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


_TYPE_NAMES = {
    "string_type": "string",
    "bool_type": "boolean",
    "int_type": "integer",
    "float_type": "number",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "list_type": "array",
}
"""pydantic's wrong-type errors -> the OpenAPI type the apiserver names (``must be of type boolean``)."""


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
        elif kind == "finite_number":
            out.append((path, f"{NOT_FINITE}{_got(inp)}"))
        elif kind in _TYPE_NAMES:
            out.append((path, f"must be of type {_TYPE_NAMES[kind]}{_got(inp)}"))
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
    elif not isinstance(api_version, str):
        problems.append(Problem(file, f"must be of type string{_got(api_version)}", label, "apiVersion"))
    elif api_version != API_VERSION:
        problems.append(
            Problem(file, f'unknown apiVersion "{api_version}" (expected {API_VERSION})', label, "apiVersion")
        )
    if kind is None:
        problems.append(Problem(file, "Required value", label, "kind"))
    elif not isinstance(kind, str):
        problems.append(Problem(file, f"must be of type string{_got(kind)}", label, "kind"))
    elif kind not in KINDS:
        known = " or ".join(KINDS)
        problems.append(Problem(file, f'unknown kind "{kind}" (expected {known})', label, "kind"))
    if problems or not isinstance(kind, str):
        return None, problems
    try:
        obj = KINDS[kind].model_validate(drop_nulls(doc))
    except ValidationError as exc:
        return None, [Problem(file, msg, label, path) for path, msg in error_lines(exc)]
    except RecursionError:  # a guard only: _too_deep rejects such documents before they are loaded
        return None, [Problem(file, f"nested deeper than {MAX_DEPTH} levels", label)]
    return obj, []


# ------------------------------------------------------------------------------------------ YAML as kubectl


_TAG = "tag:yaml.org,2002:"
_GO_TRUE = frozenset(["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"])
_GO_FALSE = frozenset(["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"])
_GO_NULL = frozenset(["", "~", "null", "Null", "NULL"])
_GO_SPECIAL = {
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)")
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_GO_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
_GO_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?")


def go_yaml_scalar(text: str) -> Any:
    """A plain (unquoted) YAML scalar's value as kubectl's YAML reader (go-yaml v2, YAML 1.1) resolves it,
    then as JSON carries it: ``y``/``on``/``no`` are booleans, ``1e3``/``+.5`` numbers, ``0o10``/``010``
    octal, ``1:20`` and timestamps strings; a whole float is an int (Go writes ``4.0`` as ``4``)."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    if text in _GO_NULL:
        return None
    if text in _GO_SPECIAL:
        return _GO_SPECIAL[text]
    first = text[:1]
    value: Any = text
    if first == "." and _GO_DOT_FLOAT.fullmatch(text):
        value = float(text)
    elif first and first in "+-0123456789" and not _GO_TIMESTAMP.fullmatch(text):
        plain = text.replace("_", "")
        m = _GO_INT.fullmatch(plain)
        if m:
            digits = m.group(2)
            base = 8 if len(digits) > 1 and digits[0] == "0" and digits[1] in "01234567" else 0
            number = int(digits, base)
            number = -number if m.group(1) == "-" else number
            if -(2**63) <= number < 2**64:
                return number
        if _GO_FLOAT.fullmatch(plain):
            value = float(plain)
            if math.isinf(value):  # out of range: go-yaml keeps the text
                return text
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


class KubeLoader(yaml.SafeLoader):
    """YAML as kubectl reads it (go-yaml v2 via sigs.k8s.io/yaml, then JSON): plain scalars resolve as in
    :func:`go_yaml_scalar` (PyYAML differs on ``y``, ``1e3``, ``0o10``, ``1:20``, timestamps), and a key
    repeated in one mapping is an error, worded as the apiserver words it under ``fieldValidation=Strict``."""

    yaml_implicit_resolvers: dict[Any, Any] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            if value == "<<":
                return _TAG + "merge"
            v = go_yaml_scalar(value)
            if v is None:
                return _TAG + "null"
            return _TAG + {bool: "bool", int: "int", float: "float"}.get(type(v), "str")
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                repeated = key in seen
            except TypeError:  # unhashable key: the SafeLoader reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {json.dumps(str(key))} already set in map", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_go_scalar(loader: KubeLoader, node: yaml.ScalarNode) -> Any:
    return go_yaml_scalar(node.value)


for _t in ("bool", "int", "float", "null"):
    KubeLoader.add_constructor(_TAG + _t, _construct_go_scalar)


def drop_nulls(value: Any) -> Any:
    """``value`` without mapping entries whose value is null: the apiserver prunes a null field of a
    structural schema (and then applies its default), so ``replicas: ~`` means "unset"."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _load_all(text: str) -> Iterator[Any]:
    loader = KubeLoader(text)
    try:
        while loader.check_data():
            yield loader.get_data()
    finally:
        loader.dispose()


def _too_deep(text: str) -> tuple[str, str, int] | None:
    """(object label, field path, line) of the first node nested deeper than :data:`MAX_DEPTH`, or None.

    Walks the parser's events (no recursion), so it is safe on any nesting; YAML errors are left to the
    loader to report.
    """
    # one frame per open collection: [is_mapping, next node is a key, current key/index]
    stack: list[list[Any]] = []
    doc = 0
    kind = name = None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                doc += 1
                stack.clear()
                kind = name = None
                continue
            if stack and not isinstance(event, yaml.CollectionEndEvent):
                top = stack[-1]
                if top[0] and top[1]:  # a mapping key
                    top[1] = False
                    top[2] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                    if isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                        continue
                elif top[0]:
                    top[1] = True
                    if isinstance(event, yaml.ScalarEvent):
                        where = [f[2] for f in stack]
                        if where == ["kind"]:
                            kind = event.value
                        elif where == ["metadata", "name"]:
                            name = event.value
                else:
                    top[2] += 1
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                if len(stack) >= MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark is not None else 0
                    label = f"{kind}/{name or f'<document {doc}>'}" if kind else f"<document {doc}>"
                    return label, format_loc(f[2] for f in stack[:8]) + "...", line
                is_map = isinstance(event, yaml.MappingStartEvent)
                stack.append([is_map, is_map, -1])
            elif isinstance(event, yaml.CollectionEndEvent) and stack:
                stack.pop()
    except yaml.YAMLError:
        return None
    return None


def validate_text(
    text: str, file: str = "<stdin>", *, skip_foreign: bool = False, report: Report | None = None
) -> Report:
    """Validate every document of a (multi-document) YAML text, adding to ``report``."""
    report = report if report is not None else Report()
    report.files += 1
    deep = _too_deep(text)
    if deep is not None:
        label, path, deep_line = deep
        msg = f"nested deeper than {MAX_DEPTH} levels (no Corral field is)"
        report.problems.append(Problem(file, msg, label, path, line=deep_line or None))
        return report
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
                report.sources.append(file)
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
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in YAML_SUFFIXES)
            if not found:
                problems.append(Problem("", f"no YAML files found in {p} (looked for *.yaml and *.yml)"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(Problem(str(p), "no such file or directory"))
    return files, problems


def validate_paths(paths: Sequence[str | Path], *, skip_foreign: bool = False, cross: bool = True) -> Report:
    """Validate files and directories (see :func:`expand_paths`), and with ``cross`` the valid objects
    against each other (:func:`cross_check`)."""
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
    if cross:
        cross_check(report)
    return report


# ------------------------------------------------------------------------------------ across objects


def _ns(obj: ModelPool | RoutingPolicy) -> str:
    return obj.metadata.namespace or ""


def cross_check(report: Report) -> Report:
    """Check the valid objects of ``report`` against each other (:func:`cross_problems`); adds to
    ``report.problems``."""
    sources = [*report.sources, *[""] * (len(report.objects) - len(report.sources))]
    report.problems.extend(cross_problems(list(zip(report.objects, sources, strict=False))))
    return report


def cross_problems(objects: Sequence[tuple[ModelPool | RoutingPolicy, str]]) -> list[Problem]:
    """The problems between ``(object, source file)`` pairs given together (``corral validate`` and the
    operator's admission webhook both call this):

    * a RoutingPolicy's ``adapterPaging.pin`` entries must be adapters of its ModelPool (when the pool is
      among the objects);
    * at most one RoutingPolicy per ModelPool (the later one in ``objects`` is reported);
    * a ModelPool's ``routingPolicyRef`` and the policies' ``poolRef`` must agree;
    * ``modelSelection`` targets must be models or adapters of the pool (when given), and its rules must
      all be reachable, without overlaps at equal priority (:func:`~corral.api.selection.selection_lint`,
      checked even without the pool: static analysis the apiserver cannot do).

    Objects match by name within a namespace (an unset namespace matches only unset ones). The apiserver
    checks one object at a time; these need the others (offline here, online in
    :func:`admission_problems`). That an adapter's ``baseModel`` is a model of its pool is a rule of the
    ModelPool itself (its CRD checks it)."""
    problems: list[Problem] = []
    pools: dict[tuple[str, str], ModelPool] = {}
    policies: list[tuple[RoutingPolicy, str]] = []
    for obj, src in objects:
        if isinstance(obj, ModelPool):
            pools[(_ns(obj), obj.metadata.name)] = obj
        else:
            policies.append((obj, src))
    first: dict[tuple[str, str], RoutingPolicy] = {}
    by_name = {(_ns(rp), rp.metadata.name): (rp, src) for rp, src in policies}
    for (ns, name), pool in pools.items():
        ref = pool.spec.routing_policy_ref
        if ref is not None and (ns, ref) in by_name:
            rp, src = by_name[(ns, ref)]
            if rp.spec.pool_ref != name:
                msg = (
                    f'names ModelPool "{rp.spec.pool_ref}" but ModelPool "{name}" names this policy in '
                    "spec.routingPolicyRef"
                )
                problems.append(Problem(src, msg, f"RoutingPolicy/{ref}", "spec.poolRef"))
    for rp, src in policies:
        label = f"RoutingPolicy/{rp.metadata.name}"
        key = (_ns(rp), rp.spec.pool_ref)
        if key in first:
            other = first[key].metadata.name
            msg = f'ModelPool "{rp.spec.pool_ref}" already has RoutingPolicy "{other}" (one policy per pool)'
            problems.append(Problem(src, msg, label, "spec.poolRef"))
        else:
            first[key] = rp
        for path, msg in selection_lint(rp.spec.model_selection):
            problems.append(Problem(src, msg, label, f"spec.modelSelection{path}"))
        target = pools.get(key)
        if target is None:
            continue
        ref = target.spec.routing_policy_ref
        if ref is not None and ref != rp.metadata.name:
            msg = (
                f'ModelPool "{target.metadata.name}" names RoutingPolicy "{ref}" in spec.routingPolicyRef, '
                f'not "{rp.metadata.name}"'
            )
            problems.append(Problem(src, msg, label, "spec.poolRef"))
        adapters = {a.name for a in target.spec.adapters}
        served = adapters | {m.name for m in target.spec.models}
        for path, msg in pool_issues(rp.spec.model_selection, target.metadata.name, served):
            problems.append(Problem(src, msg, label, f"spec.modelSelection{path}"))
        for i, name in enumerate(rp.spec.adapter_paging.pin):
            if name not in adapters:
                msg = f'must name an adapter of ModelPool "{target.metadata.name}" (got "{name}")'
                problems.append(Problem(src, msg, label, f"spec.adapterPaging.pin[{i}]"))
        private = [a.name for a in target.spec.adapters if a.tenant]
        if private and rp.spec.tenants is None:
            msg = (
                f'must be set: ModelPool "{target.metadata.name}" has adapters private to a tenant '
                f"({', '.join(private)}: spec.adapters[].tenant), which a router without tenant API keys "
                "serves to nobody"
            )
            problems.append(Problem(src, msg, label, "spec.tenants"))
    return problems


def load_object(doc: Any) -> ModelPool | RoutingPolicy | None:
    """A live object (an apiserver's JSON: its ``status`` is ignored) as a model; None when it is not a
    valid Corral object."""
    if not isinstance(doc, dict):
        return None
    obj, _problems = validate_document({k: v for k, v in doc.items() if k != "status"}, "", 0)
    return obj


def admission_problems(
    new: ModelPool | RoutingPolicy,
    others: Sequence[ModelPool | RoutingPolicy],
    old: ModelPool | RoutingPolicy | None = None,
) -> list[Problem]:
    """The problems (:func:`cross_problems`) that creating ``new``, or changing ``old`` into ``new``, adds
    among ``others`` (the objects already stored beside it, ``new``'s previous version excluded).
    Problems that were there before the change do not count: a change that does not make things worse
    is admitted. Problems carry no file, so they print as ``Kind/name: field.path: message``, as
    ``corral validate`` prints them after its file name."""
    me = (new.kind, _ns(new), new.metadata.name)
    rest = [(o, "") for o in others if (o.kind, _ns(o), o.metadata.name) != me]
    before = set(cross_problems([*rest, *([(old, "")] if old is not None else [])]))
    return [p for p in cross_problems([*rest, (new, "")]) if p not in before]
