"""The chart's RBAC is exactly what the operator's code uses: derived here from operator/corral/operator/*.py
by reading its source (no cluster), compared with the rules ``helm template`` renders.

What is derived, and how:
* ``kube.py``: each ``Kube`` method's verbs, from the ``CustomObjectsApi`` calls in its body
  (``get_…`` -> get, ``list_…`` -> list, ``patch_…_status`` -> patch on ``<plural>/status``,
  ``patch_…`` -> patch, plus create when it is a server-side apply (``apply-patch``: the apiserver
  authorizes create when the object does not exist yet), ``delete_…`` -> delete);
* every call ``<x>.<Kube method>(GROUP, VERSION, PLURAL, …)`` in the operator's modules, the constants
  resolved from the module-level assignments;
* every kopf resource handler ``@kopf.on.*`` / ``@kopf.index`` / ``@kopf.timer`` / ``@kopf.daemon``: list +
  watch of the resource, and for the non-index ones patch of the resource (finalizer, progress
  annotations) and of its ``/status`` (``patch.status``);
* ``kopf.info`` / ``kopf.warn`` / ``kopf.event`` / ``kopf.exception``: create core Events;
* kopf itself: list + watch of CustomResourceDefinitions (its resource observer), and of Namespaces when
  it watches a list of namespaces (its namespace observer).

Any other Kubernetes client call in the operator (``client.XxxApi``, a CustomObjectsApi method not in
the table) fails the test until the table learns it, so a new API call cannot slip past the chart.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chart_testkit
import pytest

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator" / "corral" / "operator"
Rule = tuple[str, str, str]  # (apiGroup, resource, verb)

CUSTOM_OBJECTS_VERBS = {
    "get_namespaced_custom_object": ("get",),
    "list_namespaced_custom_object": ("list",),
    "patch_namespaced_custom_object": ("patch",),
    "patch_namespaced_custom_object_status": ("patch",),
    "delete_namespaced_custom_object": ("delete",),
}
KOPF_HANDLERS = {"create", "update", "delete", "resume", "field", "event"}
KOPF_EVENTS = {"info", "warn", "event", "exception"}
FRAMEWORK_CLUSTER: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
FRAMEWORK_NAMESPACES: set[Rule] = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# kopf.on.validate / kopf.on.mutate with settings.admission.managed: kopf creates and patches both
# configuration kinds (its validating and mutating configuration managers run either way)
FRAMEWORK_WEBHOOK: set[Rule] = {
    ("admissionregistration.k8s.io", f"{kind}webhookconfigurations", verb)
    for kind in ("validating", "mutating")
    for verb in ("create", "patch")
}
# kopf's peering: watches its peering object and patches its keep-alives into it
FRAMEWORK_PEERING_VERBS = ("list", "patch", "watch")
CREATE_CALLS = {"create_cluster_custom_object": 2, "create_namespaced_custom_object": 3}  # plural's arg index


# Modules in the operator package that the operator process never runs: user-side tools with the user's
# own credentials (``corral doctor``) and the chart generator.
NOT_THE_OPERATOR = {"doctor.py", "chart_values.py"}


def _modules() -> dict[str, ast.Module]:
    paths = [p for p in sorted(OPERATOR_DIR.glob("*.py")) if p.name not in NOT_THE_OPERATOR]
    return {p.name: ast.parse(p.read_text(), str(p)) for p in paths}


def _constants(mods: dict[str, ast.Module]) -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in mods.values():
        for node in mod.body:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                if len(names) != len(values):
                    continue
                for n, v in zip(names, values, strict=True):
                    if isinstance(n, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        out[n.id] = v.value
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    yield from (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def kube_method_verbs(mods: dict[str, ast.Module]) -> dict[str, set[tuple[str, str]]]:
    """Kube method -> {(verb, subresource)} from the CustomObjectsApi calls in its body."""
    cls = next(n for n in mods["kube.py"].body if isinstance(n, ast.ClassDef) and n.name == "Kube")
    out: dict[str, set[tuple[str, str]]] = {}
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
            continue
        verbs: set[tuple[str, str]] = set()
        for call in _calls(fn):
            name = _dotted(call.func)
            if not name.startswith("self.custom."):
                continue
            method = name.removeprefix("self.custom.")
            assert method in CUSTOM_OBJECTS_VERBS, (
                f"Kube.{fn.name}: unknown API call {method}: teach this test"
            )
            sub = "/status" if method.endswith("_status") else ""
            verbs |= {(v, sub) for v in CUSTOM_OBJECTS_VERBS[method]}
            content = next((k.value for k in call.keywords if k.arg == "_content_type"), None)
            if isinstance(content, ast.Constant) and content.value == "application/apply-patch+yaml":
                verbs.add(("create", sub))
        if verbs:
            out[fn.name] = verbs
    return out


class Derived:
    """What the operator's code needs: always (``base``), with ``--webhook`` (``webhook``), with
    ``--peering`` (``peering``: the kopf.dev plurals it creates)."""

    def __init__(self) -> None:
        self.base: set[Rule] = set()
        self.webhook: set[Rule] = set()
        self.peering_plurals: set[str] = set()
        self.peering_group = ""

    def namespaced(self) -> set[Rule]:
        return set(self.base)

    def cluster(self, *, namespaced_mode: bool, webhook: bool) -> set[Rule]:
        out = set(FRAMEWORK_CLUSTER)
        if namespaced_mode:
            out |= FRAMEWORK_NAMESPACES
        if webhook:
            out |= self.webhook
        return out

    def peering(self, plural: str) -> set[Rule]:
        assert plural in self.peering_plurals, f"the operator never creates {plural}"
        return {(self.peering_group, plural, v) for v in ("create", *FRAMEWORK_PEERING_VERBS)}


def derived_rules() -> Derived:
    mods = _modules()
    consts = _constants(mods)
    methods = kube_method_verbs(mods)
    out = Derived()

    def resolve(node: ast.AST) -> str | None:
        return consts.get(node.id) if isinstance(node, ast.Name) else None

    for fname, mod in mods.items():
        for call in _calls(mod):
            name = _dotted(call.func)
            if fname != "kube.py" and name.startswith("client.") and name.endswith("Api"):
                pytest.fail(f"{fname}: direct Kubernetes client use {name}: teach test_chart_rbac.py")
            attr = name.rsplit(".", 1)[-1]
            if ".custom." in name and not name.startswith("self.custom."):
                # CustomObjectsApi used outside the Kube class: only the peering objects' creation
                assert attr in CREATE_CALLS, f"{fname}: {name}: teach test_chart_rbac.py"
                arg = call.args[CREATE_CALLS[attr]]
                group, plural = resolve(call.args[0]), resolve(arg)
                if plural is None and isinstance(arg, ast.Constant):
                    plural = str(arg.value)
                assert group and plural, f"{fname}: {name}: cannot resolve its resource"
                out.peering_group = group
                out.peering_plurals.add(str(plural))
                continue
            # Kube methods called with (GROUP, VERSION, PLURAL, ...)
            if attr in methods and len(call.args) >= 3 and not name.startswith(("self.", "kopf.")):
                group, plural = resolve(call.args[0]), resolve(call.args[2])
                if group is None or plural is None:
                    continue  # e.g. dict.get(...), or a loop variable over constants seen elsewhere
                out.base |= {(group, plural + sub, verb) for verb, sub in methods[attr]}
            if name in {f"kopf.{e}" for e in KOPF_EVENTS}:
                out.base.add(("", "events", "create"))
        for fn in ast.walk(mod):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for deco in fn.decorator_list:
                if not isinstance(deco, ast.Call):
                    continue
                dname = _dotted(deco.func)
                kind = dname.removeprefix("kopf.on.") if dname.startswith("kopf.on.") else dname
                if kind in ("validate", "mutate"):
                    out.webhook |= FRAMEWORK_WEBHOOK
                    continue
                if kind not in KOPF_HANDLERS | {"kopf.index", "kopf.timer", "kopf.daemon"}:
                    continue
                group, plural = resolve(deco.args[0]), resolve(deco.args[2])
                assert group and plural, f"{fname}:{fn.name}: cannot resolve the handler's resource"
                out.base |= {(group, plural, "list"), (group, plural, "watch")}
                if kind != "kopf.index":
                    out.base |= {(group, plural, "patch"), (group, f"{plural}/status", "patch")}
    return out


def _rules(obj: dict[str, Any]) -> set[Rule]:
    out: set[Rule] = set()
    for r in obj.get("rules") or []:
        assert not r.get("resourceNames") and not r.get("nonResourceURLs")
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    assert "*" not in (g, res, v), f"wildcard in {obj['kind']} {obj['metadata']['name']}: {r}"
                    out.add((g, res, v))
    return out


def test_the_derivation_sees_the_operators_calls() -> None:
    d = derived_rules()
    # a few anchors so a broken scanner (finding nothing) cannot pass
    assert ("ray.io", "rayservices", "delete") in d.base
    assert ("ray.io", "rayclusters", "patch") in d.base
    assert ("corral.dev", "modelpools/status", "patch") in d.base
    assert ("", "events", "create") in d.base
    assert d.webhook == FRAMEWORK_WEBHOOK
    assert d.peering_plurals == {"clusterkopfpeerings", "kopfpeerings"}


def _roles(objs: list[dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {
        (o["kind"], o["metadata"].get("namespace")): o for o in objs if o["kind"] in ("ClusterRole", "Role")
    }


@pytest.mark.parametrize("webhook", [False, True])
@pytest.mark.parametrize("peering", [False, True])
def test_clusterwide_rbac_is_exactly_what_the_operator_uses(webhook: bool, peering: bool) -> None:
    d = derived_rules()
    objs = chart_testkit.template(
        "--set", f"webhook.enabled={str(webhook).lower()},operator.peering.enabled={str(peering).lower()}"
    )
    roles = _roles(objs)
    assert list(roles) == [("ClusterRole", None)]
    want = d.namespaced() | d.cluster(namespaced_mode=False, webhook=webhook)
    if peering:
        want |= d.peering("clusterkopfpeerings")
    assert _rules(roles["ClusterRole", None]) == want
    binding = next(o for o in objs if o["kind"] == "ClusterRoleBinding")
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "corral-system"}
    ]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "--all-namespaces" in args
    assert ("--webhook" in args) == webhook and ("--peering=corral" in args) == peering


@pytest.mark.parametrize("peering", [False, True])
def test_namespaced_rbac_is_a_role_per_watched_namespace(peering: bool) -> None:
    d = derived_rules()
    objs = chart_testkit.template(
        "--set",
        "operator.watchNamespaces={team-a,team-b}",
        "--set",
        f"operator.peering.enabled={str(peering).lower()}",
    )
    roles = _roles(objs)
    assert set(roles) == {("ClusterRole", None), ("Role", "team-a"), ("Role", "team-b")}
    assert _rules(roles["ClusterRole", None]) == d.cluster(namespaced_mode=True, webhook=False)
    for ns in ("team-a", "team-b"):
        want = d.namespaced() | (d.peering("kopfpeerings") if peering else set())
        assert _rules(roles["Role", ns]) == want
    bindings = {o["metadata"].get("namespace") for o in objs if o["kind"] == "RoleBinding"}
    assert bindings == {"team-a", "team-b"}
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_rbac_create_false_renders_no_rbac() -> None:
    objs = chart_testkit.template("--set", "rbac.create=false")
    assert not [o for o in objs if "Role" in o["kind"]]
