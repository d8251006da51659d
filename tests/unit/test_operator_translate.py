"""corral.operator.translate: ModelPool + RoutingPolicy -> KubeRay RayService / Serve REST config.

The update rules are KubeRay v1.5's (rayservice_controller.go): only a serveConfigV2 change, a change of
worker-group replica counts, or worker groups appended at the end are applied to the running cluster;
anything else builds a new cluster. Each routine change is checked to stay within those bounds by
diffing the whole generated object.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.operator import translate as t
from corral.serve.app import gpu_class_resource, plan_pool, serve_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


@pytest.fixture
def pool() -> dict[str, Any]:
    mp = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    mp["metadata"]["uid"] = "1f0c2f6e-0000-4000-8000-000000000001"
    return dict(mp)


@pytest.fixture
def policy() -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text()))


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths (dotted; list items by groupName/name or index) where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_paths(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            key = x.get("groupName", x.get("name", i)) if isinstance(x, dict) else i
            out += diff_paths(x, y, f"{path}[{key}]")
        return out
    return [] if a == b else [path]


def groups(rs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def serve_cfg(rs: dict[str, Any]) -> dict[str, Any]:
    return dict(yaml.safe_load(rs["spec"]["serveConfigV2"]))


# ------------------------------------------------------------------------------------------ shape


def test_rayservice_shape(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    rs = t.ray_service(pool, policy)
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    meta = rs["metadata"]
    assert (meta["name"], meta["namespace"]) == ("llama-8b", "default")
    assert meta["labels"][t.POOL_LABEL] == "llama-8b"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "corral.dev/v1alpha1",
            "kind": "ModelPool",
            "name": "llama-8b",
            "uid": pool["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["metadata"]["labels"][t.POOL_LABEL] == "llama-8b"

    by_class = {c["name"]: c for c in pool["spec"]["gpuClasses"]}
    assert [g["groupName"] for g in groups(rs)] == ["gpu-h100", "gpu-a100"]
    for g in groups(rs):
        cls = g["groupName"].removeprefix("gpu-")
        c = by_class[cls]
        assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (
            c["replicas"],
            c["minReplicas"],
            c["maxReplicas"],
        )
        res = json.loads(g["rayStartParams"]["resources"].strip("'"))
        assert res == {gpu_class_resource(cls): c["gpusPerReplica"]}
        pod = g["template"]["spec"]
        assert pod["nodeSelector"] == c["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(c["gpusPerReplica"])
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(c["gpusPerReplica"])
        labels = g["template"]["metadata"]["labels"]
        assert labels == {t.POOL_LABEL: "llama-8b", t.GPU_CLASS_LABEL: cls}


def test_serve_config_v2_is_the_serve_translation(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    """serveConfigV2 is serve_config(plan_pool(...)) of the CRs, not a re-derivation."""
    rs = t.ray_service(pool, policy)
    expected = serve_config(plan_pool(t.clean_pool(pool), t.clean_policy(policy), {}))
    assert serve_cfg(rs) == expected
    (app,) = expected["applications"]
    engines = {d["name"]: d for d in app["deployments"] if d["name"] != "router"}
    for d in engines.values():
        (res,) = d["ray_actor_options"]["resources"]
        assert res in {gpu_class_resource("h100"), gpu_class_resource("a100")}


def test_server_set_metadata_and_status_do_not_reach_the_rayservice(
    pool: dict[str, Any], policy: dict[str, Any]
) -> None:
    live = copy.deepcopy(pool)
    live["metadata"].update(
        resourceVersion="12345",
        generation=7,
        creationTimestamp="2026-12-02T12:00:00Z",
        managedFields=[{"manager": "kubectl", "operation": "Apply"}],
        annotations={"note": "x"},
        finalizers=["corral.dev/finalizer"],
    )
    live["status"] = {"observedGeneration": 6, "conditions": []}
    live_policy = copy.deepcopy(policy)
    live_policy["metadata"].update(resourceVersion="99", generation=3, uid="p-uid")
    live_policy["status"] = {"observedGeneration": 3}
    assert t.ray_service(live, live_policy) == t.ray_service(pool, policy)


def test_deterministic(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    assert t.ray_service(pool, policy) == t.ray_service(copy.deepcopy(pool), copy.deepcopy(policy))


def test_gpus_per_replica_and_models_multiply_pods(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    pool["spec"]["gpuClasses"][0]["gpusPerReplica"] = 2
    second = dict(pool["spec"]["models"][0], name="qwen-7b", baseModel="Qwen/Qwen2.5-7B-Instruct")
    pool["spec"]["models"].append(second)
    h100 = groups(t.ray_service(pool, policy))[0]
    # one engine replica per pod: 4 replicas x 2 models
    assert (h100["replicas"], h100["minReplicas"], h100["maxReplicas"]) == (8, 4, 16)
    assert h100["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert json.loads(h100["rayStartParams"]["resources"].strip("'")) == {gpu_class_resource("h100"): 2}


# ------------------------------------------------------------------------------------------ update rules


def test_policy_change_only_changes_serve_config(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    policy["spec"]["strategy"] = "least_loaded"
    policy["spec"]["ttftSloMs"] = 500
    new = t.ray_service(pool, policy, existing=old)
    assert diff_paths(old, new) == ["spec.serveConfigV2"]
    assert t.update_kind(old, new) == "serve-config"
    # in the Serve config only the router's user_config changed (a live reconfigure, no restart)
    old_app, new_app = serve_cfg(old)["applications"][0], serve_cfg(new)["applications"][0]
    changed = diff_paths(old_app, new_app)
    assert changed and all(p.startswith("deployments[router].user_config.policy") for p in changed), changed


def test_adapter_change_only_changes_serve_config(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    pool["spec"]["adapters"].append(
        {"name": "new-one", "baseModel": "llama-3.1-8b-instruct", "rank": 8, "source": "file:///a/new-one"}
    )
    new = t.ray_service(pool, policy, existing=old)
    assert diff_paths(old, new) == ["spec.serveConfigV2"]
    assert t.update_kind(old, new) == "serve-config"


def test_replica_change_only_touches_that_group(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    pool["spec"]["gpuClasses"][1].update(replicas=3, maxReplicas=6)
    new = t.ray_service(pool, policy, existing=old)
    assert sorted(diff_paths(old, new)) == [
        "spec.rayClusterConfig.workerGroupSpecs[gpu-a100].maxReplicas",
        "spec.rayClusterConfig.workerGroupSpecs[gpu-a100].replicas",
        "spec.serveConfigV2",
    ]
    assert t.cluster_hash_view(old) == t.cluster_hash_view(new)
    assert t.update_kind(old, new) == "in-place"


def test_new_gpu_class_is_appended_last(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    l4 = {
        "name": "l4",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "minReplicas": 1,
        "maxReplicas": 2,
        "profile": "L4",
    }
    pool["spec"]["gpuClasses"].insert(0, l4)  # first in the pool's list ...
    new = t.ray_service(pool, policy, existing=old)
    assert [g["groupName"] for g in groups(new)] == [
        "gpu-h100",
        "gpu-a100",
        "gpu-l4",
    ]  # ... last in the cluster
    assert groups(new)[:2] == groups(old)
    assert t.update_kind(old, new) == "in-place"
    # without a live RayService the pool's order is used
    assert [g["groupName"] for g in groups(t.ray_service(pool, policy))] == ["gpu-l4", "gpu-h100", "gpu-a100"]


def test_reordering_classes_in_the_pool_keeps_the_live_order(
    pool: dict[str, Any], policy: dict[str, Any]
) -> None:
    old = t.ray_service(pool, policy)
    pool["spec"]["gpuClasses"].reverse()
    new = t.ray_service(pool, policy, existing=old)
    assert groups(new) == groups(old)
    assert t.update_kind(old, new) in ("serve-config", "none")


def test_removed_gpu_class_is_retired_in_place(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    del pool["spec"]["gpuClasses"][0]  # h100 leaves the pool
    new = t.ray_service(pool, policy, existing=old)
    h100 = groups(new)[0]
    assert h100["groupName"] == "gpu-h100"
    assert (h100["replicas"], h100["minReplicas"], h100["maxReplicas"]) == (0, 0, 0)
    assert t.cluster_hash_view(old) == t.cluster_hash_view(new)
    assert t.update_kind(old, new) == "in-place"
    deployments = [d["name"] for d in serve_cfg(new)["applications"][0]["deployments"]]
    assert not any(n.endswith("-h100") for n in deployments)


def test_pod_changes_need_a_new_cluster(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    pool["spec"]["gpuClasses"][0]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert t.update_kind(old, t.ray_service(pool, policy, existing=old)) == "new-cluster"
    image = t.ray_service(pool, policy, t.RayServiceOptions(image="other:1"), existing=old)
    assert t.update_kind(old, image) == "new-cluster"
    assert t.update_kind(None, old) == "new-cluster"
    assert t.update_kind(old, copy.deepcopy(old)) == "none"


# ------------------------------------------------------------------------------------------ details


def test_rayservice_names_fit_kuberay() -> None:
    assert t.rayservice_name("llama-8b") == "llama-8b"
    for name in ("a" * 63, "llama.v3.1", "8b-pool", "x" * 40 + ".y"):
        got = t.rayservice_name(name)
        assert len(got) <= t.RAYSERVICE_NAME_MAX
        assert got[0].isalpha() and all(c.isalnum() or c == "-" for c in got) and got == got.lower()
    assert t.rayservice_name("a" * 63) != t.rayservice_name("a" * 62)
    assert t.rayservice_name("llama.v3") != t.rayservice_name("llama-v3")


def test_no_owner_reference_without_uid(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    del pool["metadata"]["uid"]
    assert "ownerReferences" not in t.ray_service(pool, policy)["metadata"]


def test_tenants_secret_is_mounted_for_the_routers(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    policy["spec"]["tenants"] = {"secretRef": {"name": "llama-keys", "key": "keys.yaml"}}
    rs = t.ray_service(pool, policy)
    cluster = rs["spec"]["rayClusterConfig"]
    for tmpl in [cluster["headGroupSpec"]["template"], *(g["template"] for g in groups(rs))]:
        assert tmpl["spec"]["volumes"] == [
            {"name": t.API_KEYS_VOLUME, "secret": {"secretName": "llama-keys"}}
        ]
        assert tmpl["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == t.API_KEYS_DIR
    args = serve_cfg(rs)["applications"][0]["args"]
    assert args["options"]["api_keys_file"] == f"{t.API_KEYS_DIR}/keys.yaml"


def test_invalid_pool_is_a_value_error(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    pool["spec"]["gpuClasses"][0]["replicas"] = 100  # > maxReplicas
    with pytest.raises(ValueError, match="ModelPool llama-8b is invalid"):
        t.ray_service(pool, policy)


def test_target_annotation(pool: dict[str, Any]) -> None:
    assert t.target_of(pool) == "rayservice"
    assert t.target_of(pool, default="ray") == "ray"
    pool["metadata"]["annotations"] = {t.TARGET_ANNOTATION: "ray"}
    assert t.target_of(pool) == "ray"
    pool["metadata"]["annotations"] = {t.TARGET_ANNOTATION: "k8s"}
    with pytest.raises(ValueError, match="expected one of rayservice, ray"):
        t.target_of(pool)


def test_serve_rest_config_holds_every_pool(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    other = copy.deepcopy(pool)
    other["metadata"]["name"] = "other"
    other["spec"]["routingPolicyRef"] = "other"
    body = t.serve_rest_config([(pool, policy), (other, None)])
    assert [a["name"] for a in body["applications"]] == ["corral-llama-8b", "corral-other"]
    single = t.serve_rest_config([(pool, policy)])
    assert single == serve_cfg(t.ray_service(pool, policy))  # the same Serve config as serveConfigV2
    assert t.SERVE_REST_PATH == "/api/serve/applications/"
    with pytest.raises(ValueError, match="same Serve application"):
        t.serve_rest_config([(pool, policy), (copy.deepcopy(pool), None)])


def test_scale_patch_moves_only_replica_counts(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    live_cluster = {"spec": copy.deepcopy(old["spec"]["rayClusterConfig"])}
    assert t.scale_patch(old, live_cluster) == []
    pool["spec"]["gpuClasses"][1].update(replicas=3, maxReplicas=6)
    new = t.ray_service(pool, policy, existing=old)
    assert t.scale_patch(new, live_cluster) == [
        {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "gpu-a100"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/maxReplicas", "value": 6},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3},
    ]
    # a group KubeRay has not added yet is left to KubeRay
    assert t.scale_patch(new, {"spec": {"workerGroupSpecs": []}}) == []


# ------------------------------------------------------------------------------------------ Serve level


def _code_version(rs: dict[str, Any]) -> str:
    """Ray Serve's code version of the pool's application: a change restarts every replica."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    (app,) = serve_cfg(rs)["applications"]
    return str(get_app_code_version(ServeApplicationSchema.model_validate(app)))


def test_policy_change_keeps_the_serve_code_version(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    old = t.ray_service(pool, policy)
    policy["spec"]["strategy"] = "least_loaded"
    assert _code_version(t.ray_service(pool, policy, existing=old)) == _code_version(old)


@pytest.mark.parametrize("change", ["replicas", "adapters"])
def test_routine_pool_changes_keep_the_serve_code_version(
    pool: dict[str, Any], policy: dict[str, Any], change: str
) -> None:
    old = t.ray_service(pool, policy)
    if change == "replicas":
        pool["spec"]["gpuClasses"][1]["replicas"] = 3
    else:
        pool["spec"]["adapters"].pop()
    assert _code_version(t.ray_service(pool, policy, existing=old)) == _code_version(old)


def test_serve_rest_config_keeps_foreign_apps(pool: dict[str, Any], policy: dict[str, Any]) -> None:
    foreign = {"name": "someone-else", "import_path": "x:app", "route_prefix": "/x"}
    current = {
        "applications": {
            "someone-else": {"status": "RUNNING", "deployed_app_config": foreign},
            "corral-gone": {"status": "RUNNING", "deployed_app_config": {"name": "corral-gone"}},
        }
    }
    body = t.serve_rest_config([(pool, policy)], http_options={"port": 8123}, current=current)
    assert [a["name"] for a in body["applications"]] == ["corral-llama-8b", "someone-else"]
    assert body["applications"][1] == foreign
    assert body["http_options"] == {"port": 8123}
    assert t.app_name(pool) == "corral-llama-8b"
