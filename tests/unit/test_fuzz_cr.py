"""Hostile custom resources: hypothesis mutates the shipped ModelPool / RoutingPolicy examples (a value
replaced by a random or out-of-range one, a field removed, an unknown field added) and feeds them to
``corral validate``'s engine, to the operator's translation, to its status handlers and to the admission
webhook's cross-object checks.

Never an unhandled exception: validation reports problems, each naming the field (its path is the mutated
one or leads to it); the translation either builds a RayService or raises ValueError saying why; the
status handlers accept every object validation accepts. Random text as YAML is reported, never raised.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from corral.api.validation import admission_problems, drop_nulls, format_loc, load_object, validate_text
from corral.operator import handlers
from corral.operator import translate as t
from corral.router.settings import router_settings
from fuzz_testkit import fuzz_settings, tried
from hypothesis import given
from hypothesis import strategies as st

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
POOL = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
POLICY = yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text())

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.sampled_from([0, -1, 1 << 31, 1 << 53, 10**6, 0.5, -0.0, 1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["", "H100", "A100-80GB", "file:///x", "s3://b/k", "../../etc/passwd", "a" * 300]),
)
value = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """``doc`` with one change; returns it and the changed path."""
    out = copy.deepcopy(doc)
    path = draw(st.sampled_from([p for p in paths(out) if p[0] == "spec"]))
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "replace", "delete", "unknown"]))
    if action == "replace":
        parent[last] = draw(value)
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        name = draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in parent))
        parent[name] = draw(value)
        path = (*path[:-1], name)
    else:
        parent.append(draw(value))
        path = (*path[:-1], len(parent) - 1)
    return out, path


def _related(problem_path: str, changed: str) -> bool:
    return changed.startswith(problem_path) or problem_path.startswith(changed.rsplit(".", 1)[0])


@fuzz_settings(100)
@given(
    st.sampled_from(["pool", "policy"]).flatmap(
        lambda w: st.tuples(st.just(w), mutated(POOL if w == "pool" else POLICY))
    )
)
def test_mutated_crs_are_reported_by_field(case: tuple[str, tuple[dict[str, Any], tuple[Any, ...]]]) -> None:
    which, (doc, path) = case
    tried("CRs: mutated ModelPool / RoutingPolicy through corral validate + operator translation")
    pool, policy = (doc, POLICY) if which == "pool" else (POOL, doc)
    text = yaml.safe_dump_all([pool, policy], sort_keys=False)
    report = validate_text(text, "fuzz.yaml")
    changed = format_loc(path)
    for p in report.problems:
        assert str(p) and p.message, p
    if not report.ok:
        assert any(p.path and _related(p.path, changed) for p in report.problems), (changed, report.problems)
    # the operator: a RayService, or a ValueError saying why (never KeyError / TypeError / ...)
    try:
        rs = t.ray_service(pool, policy)
    except ValueError as e:
        assert str(e)
    else:
        assert rs["kind"] == "RayService"
    # the admission webhook's path: a live object -> model (None when invalid), then cross-object checks
    new = load_object(doc)
    if report.ok:  # what the apiserver stores (nulls pruned) reaches the operator's handlers
        pool_m, policy_m = report.objects[0], report.objects[1]
        router_settings(policy_m, pool_m)  # type: ignore[arg-type]
        assert handlers.pool_status(drop_nulls(pool), None)["conditions"]
        old = load_object(POOL if which == "pool" else POLICY)
        other = policy_m if which == "pool" else pool_m
        assert new is not None
        for p in admission_problems(new, [other], old):
            assert p.message, p


@fuzz_settings(200)
@given(st.text(max_size=200) | value.map(lambda v: yaml.safe_dump(v)))
def test_random_yaml_is_reported(text: str) -> None:
    tried("CRs: random text / YAML through corral validate")
    report = validate_text(text, "fuzz.yaml")
    for p in report.problems:
        assert str(p)
