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

from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
from kuberay_testkit import KubeRay
from kubernetes import client

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration
kuberay = kuberay_testkit.kuberay  # the fixture

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
