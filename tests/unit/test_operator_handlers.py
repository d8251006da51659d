"""corral.operator.handlers / kube / cli: the parts that need no cluster (status, policy lookup, render).

The handlers themselves run against the real apiserver + KubeRay in
tests/integration/test_operator_rayservice.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.operator import handlers as h
from corral.operator import kube
from corral.operator import translate as t

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


@pytest.fixture
def pool() -> dict[str, Any]:
    mp = dict(yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text()))
    mp["metadata"].update(uid="u-1", generation=3)
    return mp


@pytest.fixture
def policy() -> dict[str, Any]:
    rp = dict(yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text()))
    rp["metadata"].update(uid="p-1", generation=2)
    return rp


class FakeKube:
    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
        self.objects = objects

    def get(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((plural, namespace, name))


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_pool_status_progressing_until_kuberay_says_ready(pool: dict[str, Any]) -> None:
    st = h.pool_status(pool, None)
    assert conds(st) == {
        "Ready": ("False", "Initializing"),
        "Progressing": ("True", "Deploying"),
        "Degraded": ("False", "AsExpected"),
    }
    assert st["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] for c in st["conditions"])
    assert st["gpuClasses"] == [
        {"name": "h100", "desiredReplicas": 4, "readyReplicas": 0},
        {"name": "a100", "desiredReplicas": 2, "readyReplicas": 0},
    ]
    assert (st["modelCount"], st["adapterCount"], st["desiredReplicas"], st["readyReplicas"]) == (1, 10, 6, 0)

    rs = {
        "metadata": {"name": "llama-8b"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}],
            "activeServiceStatus": {
                "applicationStatuses": {
                    "corral-llama-8b": {
                        "serveDeploymentStatuses": {
                            "engine-llama-3.1-8b-instruct-h100": {"status": "HEALTHY"}
                        }
                    }
                }
            },
        },
    }
    ready = h.pool_status(pool, rs)
    assert conds(ready)["Ready"] == ("True", "RayServiceReady")
    assert conds(ready)["Progressing"] == ("False", "Deployed")
    assert [c["readyReplicas"] for c in ready["gpuClasses"]] == [4, 0]


def test_problem_makes_the_pool_degraded(pool: dict[str, Any]) -> None:
    st = h.pool_status(pool, None, problem=("InvalidSpec", "ModelPool llama-8b is invalid: ..."))
    assert conds(st)["Degraded"] == ("True", "InvalidSpec")
    assert conds(st)["Progressing"] == ("False", "InvalidSpec")


def test_transition_time_kept_while_status_holds() -> None:
    first = kube.merge_conditions(None, [kube.condition("Ready", False, "A")])
    again = kube.merge_conditions(first, [kube.condition("Ready", False, "B")])
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    flipped = kube.merge_conditions(
        [{**first[0], "lastTransitionTime": "2000-01-01T00:00:00Z"}], [kube.condition("Ready", True, "C")]
    )
    assert flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_find_policy(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    k: Any = FakeKube({("routingpolicies", "default", "llama-8b"): policy})
    assert h.find_policy(k, pool, {}) == (policy, None)
    # referenced but missing: defaults, with a problem naming it
    k = FakeKube({})
    got, problem = h.find_policy(k, pool, {})
    assert got is None and problem and "RoutingPolicy default/llama-8b" in problem
    # no ref: the one policy whose poolRef names the pool
    unref = copy.deepcopy(pool)
    del unref["spec"]["routingPolicyRef"]
    other = dict(copy.deepcopy(policy), metadata={**policy["metadata"], "name": "other"})
    k = FakeKube(
        {("routingpolicies", "default", "llama-8b"): policy, ("routingpolicies", "default", "other"): other}
    )
    assert h.find_policy(k, unref, {("default", "llama-8b"): ["llama-8b"]}) == (policy, None)
    got, problem = h.find_policy(k, unref, {("default", "llama-8b"): ["llama-8b", "other"]})
    assert got is None and problem and "several RoutingPolicies" in problem
    # a policy being deleted does not count
    dying = dict(policy, metadata={**policy["metadata"], "deletionTimestamp": "2026-12-02T00:00:00Z"})
    k = FakeKube({("routingpolicies", "default", "llama-8b"): dying})
    assert h.find_policy(k, unref, {("default", "llama-8b"): ["llama-8b"]}) == (None, None)


def test_policy_status_names_the_missing_pool(policy: dict[str, Any]) -> None:
    st = h._policy_status(policy, ("PoolNotFound", "ModelPool default/x (spec.poolRef) not found"), False)
    assert conds(st)["Degraded"] == ("True", "PoolNotFound")
    assert "ModelPool default/x" in st["conditions"][2]["message"]
    assert st["observedGeneration"] == 2


def test_cli_render(capsys: pytest.CaptureFixture[str]) -> None:
    from corral.api.cli import main

    assert main(["operator", "render", "-f", str(EXAMPLES)]) == 0
    (rs,) = list(yaml.safe_load_all(capsys.readouterr().out))
    pool = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    policy = yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text())
    assert rs == t.ray_service(pool, policy)


def test_adapter_residency_from_a_router_view(pool: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """status.adapterResidency: every adapter of the pool, the replicas holding it per tier (a router's
    ``residency`` view, as ``RouterDeployment.__call__`` returns it); replicas sorted."""
    names = [a["name"] for a in pool["spec"]["adapters"]]
    view = {"r1": {"gpu": [names[0]], "cpu": [names[1]]}, "r0": {"gpu": [names[0], names[1]], "cpu": []}}
    rows = {r["name"]: r for r in h.adapter_residency(pool, view)}
    assert list(rows) == names
    assert rows[names[0]] == {"name": names[0], "gpuReplicas": ["r0", "r1"], "cpuReplicas": []}
    assert rows[names[1]] == {"name": names[1], "gpuReplicas": ["r0"], "cpuReplicas": ["r1"]}
    assert rows[names[2]] == {"name": names[2], "gpuReplicas": [], "cpuReplicas": []}
    # the router is found on Serve's HTTP proxy next to the dashboard (--http-port, else Serve's 8000)
    monkeypatch.setattr(h, "CONFIG", h.OperatorConfig(ray_address="http://10.0.0.5:8265"))
    assert h.serve_http_url() == "http://10.0.0.5:8000"
    monkeypatch.setattr(
        h, "CONFIG", h.OperatorConfig(ray_address="http://127.0.0.1:8265", http_options={"port": 9000})
    )
    assert h.serve_http_url() == "http://127.0.0.1:9000"
