"""The local control plane itself: version, fake GPU nodes, scheduling, controllers, helm."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

K8S_VERSION = "v1.37.2"
GPU_CLASSES = {"H100": "NVIDIA-H100-80GB-HBM3", "A100": "NVIDIA-A100-SXM4-80GB"}


def _gpu_pod(name: str, gpu_class: str, gpus: int = 1) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            node_selector={"corral.dev/gpu-class": gpu_class},
            containers=[
                client.V1Container(
                    name="engine",
                    image="fake.invalid/engine:never-pulled",
                    resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
                )
            ],
        ),
    )


def test_apiserver_version(k8s_cluster: K8sCluster) -> None:
    info = client.VersionApi(k8s_cluster.api_client).get_code()
    assert info.git_version == K8S_VERSION
    assert (info.major, info.minor) == ("1", K8S_VERSION.split(".")[1])


def test_fake_gpu_nodes_ready_with_gpu_allocatable(k8s_cluster: K8sCluster) -> None:
    core = client.CoreV1Api(k8s_cluster.api_client)
    nodes = core.list_node(label_selector="corral.dev/gpu-class").items
    by_class: dict[str, list[str]] = {}
    for node in nodes:
        labels = node.metadata.labels
        gpu_class = labels["corral.dev/gpu-class"]
        by_class.setdefault(gpu_class, []).append(node.metadata.name)
        assert labels["nvidia.com/gpu.product"] == GPU_CLASSES[gpu_class], node.metadata.name
        assert node.metadata.name.startswith(f"{gpu_class.lower()}-node-")
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.status.capacity["nvidia.com/gpu"] == "8"
        ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
        assert ready and ready[0].status == "True", f"{node.metadata.name} not Ready: {ready}"
    assert sorted(by_class) == sorted(GPU_CLASSES), by_class


@pytest.mark.parametrize("gpu_class", sorted(GPU_CLASSES))
def test_gpu_pod_scheduled_onto_requested_class(
    k8s_cluster: K8sCluster, k8s_namespace: str, gpu_class: str
) -> None:
    core = client.CoreV1Api(k8s_cluster.api_client)
    core.create_namespaced_pod(k8s_namespace, _gpu_pod("gpu-pod", gpu_class))

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("gpu-pod", k8s_namespace)
        return pod if pod.status.phase == "Running" else None

    pod = k8s_cluster.wait_until(running, timeout=60, what=f"pod {k8s_namespace}/gpu-pod Running")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["corral.dev/gpu-class"] == gpu_class
    assert node.metadata.labels["nvidia.com/gpu.product"] == GPU_CLASSES[gpu_class]
    assert pod.status.pod_ip, "kwok should assign a fake pod IP"


def test_gpu_request_beyond_node_capacity_is_unschedulable(
    k8s_cluster: K8sCluster, k8s_namespace: str
) -> None:
    core = client.CoreV1Api(k8s_cluster.api_client)
    core.create_namespaced_pod(k8s_namespace, _gpu_pod("too-big", "H100", gpus=9))

    def unschedulable() -> str | None:
        pod = core.read_namespaced_pod("too-big", k8s_namespace)
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                return cond.message or "?"
        return None

    message = k8s_cluster.wait_until(
        unschedulable, timeout=60, what="scheduler to mark too-big Unschedulable"
    )
    assert "nvidia.com/gpu" in message
    assert core.read_namespaced_pod("too-big", k8s_namespace).spec.node_name is None


def test_deployment_pods_run_and_are_garbage_collected(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    """kube-controller-manager: Deployment -> ReplicaSet -> Pods, then ownerReference GC on delete."""
    apps = client.AppsV1Api(k8s_cluster.api_client)
    core = client.CoreV1Api(k8s_cluster.api_client)
    labels = {"app": "engine"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="engine"),
        spec=client.V1DeploymentSpec(
            replicas=3,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=_gpu_pod("unused", "A100", gpus=2).spec,
            ),
        ),
    )
    apps.create_namespaced_deployment(k8s_namespace, deployment)
    k8s_cluster.wait_until(
        lambda: (apps.read_namespaced_deployment("engine", k8s_namespace).status.ready_replicas or 0) == 3,
        timeout=90,
        what="3 ready replicas",
    )
    pods = core.list_namespaced_pod(k8s_namespace, label_selector="app=engine").items
    assert {core.read_node(p.spec.node_name).metadata.labels["corral.dev/gpu-class"] for p in pods} == {
        "A100"
    }

    apps.delete_namespaced_deployment("engine", k8s_namespace, propagation_policy="Background")
    k8s_cluster.wait_until(
        lambda: not core.list_namespaced_pod(k8s_namespace, label_selector="app=engine").items,
        timeout=90,
        what="garbage collection of the Deployment's pods",
    )


def test_namespace_with_running_pod_deletes(k8s_cluster: K8sCluster) -> None:
    """Namespace controller (KCM) + kwok's pod-delete stage: namespaces never hang in Terminating."""
    core = client.CoreV1Api(k8s_cluster.api_client)
    ns = k8s_cluster.create_namespace("ns-delete")
    core.create_namespaced_pod(ns, _gpu_pod("p", "H100"))
    k8s_cluster.wait_until(
        lambda: core.read_namespaced_pod("p", ns).status.phase == "Running", timeout=60, what="pod Running"
    )
    k8s_cluster.delete_namespace(ns, wait=True, timeout=120)
    with pytest.raises(ApiException) as exc:
        core.read_namespace(ns)
    assert exc.value.status == 404


def test_helm_version(k8s_bin_dir: Path) -> None:
    import subprocess

    out = subprocess.run(
        [str(k8s_bin_dir / "helm"), "version", "--short"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"v3\.\d+\.\d+(\+\w+)?", out), out


def test_helm_install_sees_cluster_version(
    k8s_cluster: K8sCluster, k8s_namespace: str, tmp_path: Path
) -> None:
    """helm talks to the apiserver and gets Capabilities.KubeVersion from /version (needs the ldflags)."""
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: ConfigMap
            metadata:
              name: probe
            data:
              kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
            """
        )
    )
    k8s_cluster.helm("install", "probe", str(chart), "-n", k8s_namespace, "--wait", "--timeout", "60s")
    cm = client.CoreV1Api(k8s_cluster.api_client).read_namespaced_config_map("probe", k8s_namespace)
    assert cm.data["kubeVersion"] == K8S_VERSION
    listed = k8s_cluster.helm("list", "-n", k8s_namespace, "-q").stdout.split()
    assert listed == ["probe"]
    # client-side rendering (no cluster) must also default to this minor, not helm's built-in v1.20
    rendered = k8s_cluster.helm("template", "probe", str(chart)).stdout
    assert f'kubeVersion: "v1.{K8S_VERSION.split(".")[1]}' in rendered
