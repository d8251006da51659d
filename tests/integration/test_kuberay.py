"""The real KubeRay operator (v1.5, built from its Go module) against the local control plane.

A RayService with a head group and one worker group per GPU class (H100, A100: nodeSelector on
``nvidia.com/gpu.product``, ``nvidia.com/gpu`` limits, the usual GPU toleration) is accepted by the
apiserver (vendored CRDs, strict field validation), KubeRay expands it into a RayCluster, and
kube-scheduler binds the head and every worker pod, each class's workers on nodes of that class.

Pods cannot run Ray here: kwok plays the kubelets, so pods are bound and marked Running but no container
runs; there is no Ray head or dashboard, and the RayService never becomes Ready. What is tested is what
Kubernetes and KubeRay decide: objects, their shape, and placement.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
from kuberay_testkit import KubeRay
from kubernetes import client

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

PRODUCTS = {"h100": "NVIDIA-H100-80GB-HBM3", "a100": "NVIDIA-A100-SXM4-80GB"}
NODE_CLASS = {"h100": "H100", "a100": "A100"}  # corral.dev/gpu-class label of the kwok nodes
SERVE_CONFIG = """\
applications:
- name: app
  import_path: fake.module:app
  route_prefix: /
"""


def worker_group(cls: str, replicas: int, gpus: int) -> dict[str, Any]:
    return {
        "groupName": f"gpu-{cls}",
        "replicas": replicas,
        "minReplicas": 0,
        "maxReplicas": 8,
        "rayStartParams": {"resources": f'"{{\\"corral-gpu-{cls}\\": {gpus}}}"'},
        "template": {
            "metadata": {"labels": {"corral.dev/gpu-class": cls}},
            "spec": {
                "nodeSelector": {"nvidia.com/gpu.product": PRODUCTS[cls]},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": "rayproject/ray:2.60.0",
                        "resources": {
                            "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": str(gpus)},
                            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": str(gpus)},
                        },
                    }
                ],
            },
        },
    }


def ray_service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": SERVE_CONFIG,
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-head",
                                    "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"cpu": "2", "memory": "8Gi"}},
                                }
                            ]
                        }
                    },
                },
                "workerGroupSpecs": [worker_group("h100", 2, 2), worker_group("a100", 3, 1)],
            },
        },
    }


def test_rayservice_expands_and_pods_land_on_their_gpu_class(
    k8s_cluster: K8sCluster, k8s_namespace: str, kuberay: KubeRay
) -> None:
    ns = k8s_namespace
    res = k8s_cluster.create(ray_service("gpus"), ns)
    assert res.status == 201, f"RayService rejected: {res.status} {res.message}"

    rc = k8s_cluster.wait_until(
        lambda: kuberay.ray_clusters_of(ns, "gpus"), timeout=60, what="KubeRay to create the RayCluster"
    )[0]
    rc_name = rc["metadata"]["name"]
    groups = [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]]
    assert groups == ["gpu-h100", "gpu-a100"]
    owner = rc["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("RayService", "gpus")

    def all_bound() -> list[Any] | None:
        kuberay.assert_alive()
        pods = kuberay.pods_of(ns, rc_name)
        if len(pods) == 1 + 2 + 3 and all(p.spec.node_name for p in pods):
            return pods
        return None

    pods = k8s_cluster.wait_until(all_bound, timeout=90, what="head + 5 worker pods bound to nodes")
    nodes = {n.metadata.name: n for n in client.CoreV1Api(k8s_cluster.api_client).list_node().items}
    by_group: dict[str, list[str]] = {}
    for p in pods:
        group = p.metadata.labels["ray.io/group"]
        by_group.setdefault(group, []).append(p.spec.node_name)
        if p.metadata.labels["ray.io/node-type"] == "worker":
            cls = group.removeprefix("gpu-")
            labels = nodes[p.spec.node_name].metadata.labels
            assert labels["nvidia.com/gpu.product"] == PRODUCTS[cls], (p.metadata.name, p.spec.node_name)
            assert labels["corral.dev/gpu-class"] == NODE_CLASS[cls]
            limits = p.spec.containers[0].resources.limits
            assert limits["nvidia.com/gpu"] == ("2" if cls == "h100" else "1")
    assert sorted(by_group) == ["gpu-a100", "gpu-h100", "headgroup"]
    assert (len(by_group["gpu-h100"]), len(by_group["gpu-a100"]), len(by_group["headgroup"])) == (2, 3, 1)

    # kwok marks bound pods Running (no container runs: there is no Ray behind them)
    def running() -> bool:
        return all(p.status.phase == "Running" for p in kuberay.pods_of(ns, rc_name))

    k8s_cluster.wait_until(running, timeout=60, what="kwok to mark the Ray pods Running")
    kuberay.assert_alive()


# ------------------------------------------------------------------ Corral's RayService, as KubeRay sees it


def _example(name: str) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((kuberay_testkit.REPO / "manifests" / "examples" / name).read_text()))


def test_corral_rayservice_updates_as_kuberay_decides(
    k8s_cluster: K8sCluster, k8s_namespace: str, kuberay: KubeRay
) -> None:
    """translate.ray_service of manifests/examples, applied to the real apiserver and KubeRay:

    * it is accepted (strict field validation) and expanded: head + 4 H100 + 2 A100 worker pods, each
      class on its nodes; the RayService is owned by the ModelPool;
    * RoutingPolicy change (serveConfigV2 only) and a new GPU class (appended last although it is first in
      the pool) keep the same RayCluster (same uid); a replica change is applied to the live RayCluster
      with translate.scale_patch (KubeRay does not copy replica counts), same uid, pods added;
    * deleting the ModelPool garbage-collects the RayService (ownerReference) and KubeRay's RayClusters.

    Not observable here: KubeRay v1.5 decides to build a *new* cluster (a pod-template change) in its
    status step, which it reaches only after reading Serve statuses from the head's dashboard; with no
    Ray behind the fake pods it never gets there (the in-place paths above run before that step). That
    decision is covered by translate.update_kind's unit tests, which follow KubeRay's hash rules.
    """
    from corral.operator import translate as t

    ns = k8s_namespace
    kuberay_testkit.install_corral_crds(k8s_cluster)
    pool, policy = _example("modelpool.yaml"), _example("routingpolicy.yaml")
    for obj in (pool, policy):
        res = k8s_cluster.create(obj, ns)
        assert res.status == 201, res.message
    custom = client.CustomObjectsApi(k8s_cluster.api_client)

    def live_pool() -> dict[str, Any]:
        return dict(
            custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "modelpools", "llama-8b")
        )

    def apply(rs: dict[str, Any]) -> dict[str, Any]:
        res = k8s_cluster.apply(rs, ns)
        assert res.status in (200, 201), f"{res.status} {res.message}"
        return res.body

    def live_rs() -> dict[str, Any]:
        kuberay.assert_alive()
        return kuberay.get("rayservices", ns, "llama-8b")

    def clusters() -> list[dict[str, Any]]:
        return kuberay.ray_clusters_of(ns, "llama-8b")

    def pods_by_group(rc_name: str) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for p in kuberay.pods_of(ns, rc_name):
            if p.metadata.deletion_timestamp is None:
                out.setdefault(p.metadata.labels["ray.io/group"], []).append(p)
        return out

    nodes = {n.metadata.name: n for n in client.CoreV1Api(k8s_cluster.api_client).list_node().items}

    def placed(rc_name: str, want: dict[str, int]) -> dict[str, list[Any]] | None:
        groups = pods_by_group(rc_name)
        if {g: len(ps) for g, ps in groups.items()} != want:
            return None
        if not all(p.spec.node_name for ps in groups.values() for p in ps):
            return None
        return groups

    # ---- create
    rs = t.ray_service(live_pool(), policy)
    assert rs["metadata"]["ownerReferences"][0]["uid"] == live_pool()["metadata"]["uid"]
    apply(rs)
    prev = rs  # what we generated last (the live object also carries the CRD's defaults)
    (rc,) = k8s_cluster.wait_until(clusters, timeout=60, what="RayCluster")
    rc_name, rc_uid = rc["metadata"]["name"], rc["metadata"]["uid"]
    want = {"headgroup": 1, "gpu-h100": 4, "gpu-a100": 2}
    groups = k8s_cluster.wait_until(lambda: placed(rc_name, want), timeout=90, what=f"pods {want}")
    for group, ps in groups.items():
        for p in ps:
            assert p.metadata.labels[t.POOL_LABEL] == "llama-8b"
            if group != "headgroup":
                cls = p.metadata.labels[t.GPU_CLASS_LABEL]
                selector = next(c for c in pool["spec"]["gpuClasses"] if c["name"] == cls)["nodeSelector"]
                node_labels = nodes[p.spec.node_name].metadata.labels
                assert all(node_labels.get(k) == v for k, v in selector.items()), (p.metadata.name, selector)

    def same_cluster() -> dict[str, Any]:
        (only,) = clusters()
        assert only["metadata"]["uid"] == rc_uid, "KubeRay replaced the RayCluster"
        return only

    # ---- RoutingPolicy change: serveConfigV2 only. KubeRay's reaction has no signal here (it would PUT the
    # config to the dashboard, which does not exist); the later steps, which KubeRay visibly acts on with
    # this spec in place, show that the RayCluster was kept.
    policy["spec"]["strategy"] = "least_loaded"
    new = t.ray_service(live_pool(), policy, existing=live_rs())
    assert t.update_kind(prev, new) == "serve-config"
    apply(new)
    prev = new
    assert "least_loaded" in live_rs()["spec"]["serveConfigV2"]
    same_cluster()

    # ---- replica change: a100 2 -> 3, the live RayCluster is scaled in place
    pool_obj = live_pool()
    pool_obj["spec"]["gpuClasses"][1]["replicas"] = 3
    custom.patch_namespaced_custom_object(
        "corral.dev",
        "v1alpha1",
        ns,
        "modelpools",
        "llama-8b",
        {"spec": {"gpuClasses": pool_obj["spec"]["gpuClasses"]}},
    )
    new = t.ray_service(live_pool(), policy, existing=live_rs())
    assert t.update_kind(prev, new) == "in-place"
    apply(new)
    prev = new
    live_rc = same_cluster()
    ops = t.scale_patch(new, live_rc)
    assert ops, "KubeRay copied the replica counts itself (update scale_patch's docs)"
    k8s_cluster.kubectl("-n", ns, "patch", "raycluster", rc_name, "--type=json", "-p", json.dumps(ops))
    want = {"headgroup": 1, "gpu-h100": 4, "gpu-a100": 3}
    k8s_cluster.wait_until(lambda: placed(rc_name, want), timeout=90, what=f"pods {want}")
    same_cluster()

    # ---- a new GPU class, first in the pool's list: appended last, added in place
    pool_obj = live_pool()
    big = {
        "name": "a100x2",
        "nodeSelector": {"corral.dev/gpu-class": "A100"},
        "gpusPerReplica": 2,
        "minReplicas": 1,
        "maxReplicas": 2,
        "profile": "A100-80GB",
    }
    custom.patch_namespaced_custom_object(
        "corral.dev",
        "v1alpha1",
        ns,
        "modelpools",
        "llama-8b",
        {"spec": {"gpuClasses": [big, *pool_obj["spec"]["gpuClasses"]]}},
    )
    new = t.ray_service(live_pool(), policy, existing=live_rs())
    assert [g["groupName"] for g in new["spec"]["rayClusterConfig"]["workerGroupSpecs"]][-1] == "gpu-a100x2"
    assert t.update_kind(prev, new) == "in-place"
    apply(new)
    prev = new
    want = {"headgroup": 1, "gpu-h100": 4, "gpu-a100": 3, "gpu-a100x2": 1}
    groups = k8s_cluster.wait_until(lambda: placed(rc_name, want), timeout=90, what=f"pods {want}")
    (p,) = groups["gpu-a100x2"]
    assert nodes[p.spec.node_name].metadata.labels["corral.dev/gpu-class"] == "A100"
    assert p.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
    same_cluster()

    # ---- delete the pool: the RayService (owned by it) and its RayClusters are garbage-collected
    custom.delete_namespaced_custom_object("corral.dev", "v1alpha1", ns, "modelpools", "llama-8b")

    def gone() -> bool:
        kuberay.assert_alive()
        return not kuberay.list("rayservices", ns) and not clusters()

    k8s_cluster.wait_until(gone, timeout=90, what="RayService and RayClusters garbage-collected")
