"""The Corral operator (``corral operator run``, a real kopf process) against the real apiserver and the
real KubeRay operator.

``kubectl apply`` of manifests/examples (ModelPool + RoutingPolicy) -> the operator creates the RayService
(label, ownerReference, Events, status conditions with observedGeneration) -> KubeRay creates the
RayCluster and its pods are placed -> editing the RoutingPolicy changes only serveConfigV2 (same
RayCluster uid) -> scaling a GPU class scales the live RayCluster's group in place -> a RoutingPolicy
whose pool is missing is Degraded naming it and recovers when the pool appears -> ``kubectl delete`` of
the pool runs the finalizer and the RayService is gone.

Pods cannot run Ray here (kwok fakes the kubelets), so nothing is ever Ready: the pool stays
Progressing, which is what its status must say.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
import yaml
from kuberay_testkit import KubeRay
from kubernetes import client
from operator_testkit import Operator, examples, free_port

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

G, V = "corral.dev", "v1alpha1"


@pytest.fixture
def corral_operator(k8s_cluster: K8sCluster, k8s_namespace: str, kuberay: KubeRay) -> Iterator[Operator]:
    """``corral operator run -n <namespace>`` as a subprocess (CRDs installed first), ready when its
    liveness endpoint answers."""
    kuberay_testkit.install_corral_crds(k8s_cluster)
    port = free_port()
    log = k8s_cluster.run_dir / "logs" / f"corral-operator-{k8s_namespace}.log"
    cmd = [sys.executable, "-m", "corral.api.cli", "operator", "run", "-n", k8s_namespace, "-v"]
    cmd += ["--liveness", f"http://127.0.0.1:{port}/healthz"]
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}
    op = Operator(cmd, env, log, port)
    with op.running(k8s_cluster.wait_until, 150):
        yield op


def test_operator_rayservice_lifecycle(
    k8s_cluster: K8sCluster, k8s_namespace: str, kuberay: KubeRay, corral_operator: Operator
) -> None:
    from corral.operator import translate as t

    ns, op = k8s_namespace, corral_operator
    custom = client.CustomObjectsApi(k8s_cluster.api_client)
    core = client.CoreV1Api(k8s_cluster.api_client)
    wait = k8s_cluster.wait_until

    def get(plural: str, name: str, group: str = G, version: str = V) -> dict[str, Any] | None:
        op.assert_alive()
        try:
            return dict(custom.get_namespaced_custom_object(group, version, ns, plural, name))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def rayservice(name: str = "llama-8b") -> dict[str, Any] | None:
        return get("rayservices", name, "ray.io", "v1")

    def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
        for c in ((obj or {}).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return dict(c)
        return {}

    def events(name: str, kind: str = "ModelPool") -> set[str]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        evs = core.list_namespaced_event(ns, field_selector=selector).items
        return {e.reason for e in evs}

    docs = examples(ns)
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    pool = wait(lambda: get("modelpools", "llama-8b"), timeout=10, what="ModelPool")

    # ---- the operator creates the RayService; KubeRay the RayCluster
    rs = wait(rayservice, timeout=60, what="RayService")
    assert rs["metadata"]["labels"][t.POOL_LABEL] == "llama-8b"
    (owner,) = rs["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ModelPool", "llama-8b", pool["metadata"]["uid"])
    (rc,) = wait(lambda: kuberay.ray_clusters_of(ns, "llama-8b"), timeout=60, what="RayCluster")
    rc_uid = rc["metadata"]["uid"]
    assert rc["metadata"]["labels"][t.POOL_LABEL] == "llama-8b"  # KubeRay copies the RayService's labels

    def pods(group: str) -> list[Any]:
        return [
            p
            for p in kuberay.pods_of(ns, rc["metadata"]["name"])
            if p.metadata.labels.get("ray.io/group") == group and p.metadata.deletion_timestamp is None
        ]

    wait(lambda: len(pods("gpu-h100")) == 4 and len(pods("gpu-a100")) == 2, timeout=60, what="worker pods")
    for p in kuberay.pods_of(ns, rc["metadata"]["name"]):
        assert p.metadata.labels[t.POOL_LABEL] == "llama-8b", p.metadata.name

    def pool_status_at(gen: int) -> dict[str, Any] | None:
        p = get("modelpools", "llama-8b")
        return p if p and (p.get("status") or {}).get("observedGeneration") == gen else None

    pool = wait(lambda: pool_status_at(pool["metadata"]["generation"]), timeout=30, what="pool status")
    st = pool["status"]
    assert cond(pool, "Degraded")["status"] == "False"
    assert cond(pool, "Ready")["status"] == "False"  # no Ray behind the fake pods
    progressing = cond(pool, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "Deploying")
    assert all(c["observedGeneration"] == pool["metadata"]["generation"] for c in st["conditions"])
    assert {c["name"]: c["desiredReplicas"] for c in st["gpuClasses"]} == {"h100": 4, "a100": 2}
    assert (st["modelCount"], st["adapterCount"], st["desiredReplicas"]) == (1, 10, 6)
    assert "RayServiceCreated" in wait(lambda: events("llama-8b"), timeout=20, what="pool Events")

    # ---- RoutingPolicy edit: only serveConfigV2 changes, the RayCluster stays
    before = rayservice()
    assert before is not None
    k8s_cluster.kubectl(
        "-n",
        ns,
        "patch",
        "routingpolicy",
        "llama-8b",
        "--type=merge",
        "-p",
        '{"spec":{"strategy":"least_loaded"}}',
    )
    after = wait(
        lambda: (r := rayservice()) and "least_loaded" in r["spec"]["serveConfigV2"] and r,
        timeout=30,
        what="serveConfigV2 with the new strategy",
    )
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    old_cfg, new_cfg = (
        yaml.safe_load(before["spec"]["serveConfigV2"]),
        yaml.safe_load(after["spec"]["serveConfigV2"]),
    )
    old_deps = {d["name"]: d for d in old_cfg["applications"][0]["deployments"]}
    new_deps = {d["name"]: d for d in new_cfg["applications"][0]["deployments"]}
    assert {n for n in new_deps if new_deps[n] != old_deps[n]} == {"router"}  # engines untouched
    assert new_deps["router"]["user_config"]["policy"]["strategy"] == "least_loaded"
    policy = wait(
        lambda: (
            (p := get("routingpolicies", "llama-8b"))
            and (p.get("status") or {}).get("observedGeneration") == 2
            and p
        ),
        timeout=30,
        what="policy status",
    )
    assert cond(policy, "Degraded")["status"] == "False"
    (same,) = kuberay.ray_clusters_of(ns, "llama-8b")
    assert same["metadata"]["uid"] == rc_uid

    # ---- scale a GPU class: only that worker group, on the live RayCluster
    classes = copy.deepcopy(get("modelpools", "llama-8b"))["spec"]["gpuClasses"]  # type: ignore[index]
    classes[1]["replicas"] = 3
    k8s_cluster.kubectl(
        "-n",
        ns,
        "patch",
        "modelpool",
        "llama-8b",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"gpuClasses": classes}}),
    )
    wait(lambda: len(pods("gpu-a100")) == 3, timeout=60, what="a third A100 worker pod")
    assert len(pods("gpu-h100")) == 4
    (same,) = kuberay.ray_clusters_of(ns, "llama-8b")
    assert same["metadata"]["uid"] == rc_uid
    assert "Scaled" in wait(
        lambda: "Scaled" in events("llama-8b") and events("llama-8b"), timeout=20, what="Event"
    )

    # ---- a restarted operator resumes without rewriting anything
    rs_version = (rayservice() or {})["metadata"]["resourceVersion"]
    resumed = op.count("Resuming is processed")
    op.stop()
    op.start(wait)
    wait(lambda: op.count("Resuming is processed") >= resumed + 2, timeout=30, what="pool + policy resumed")
    assert (rayservice() or {})["metadata"]["resourceVersion"] == rs_version
    (same,) = kuberay.ray_clusters_of(ns, "llama-8b")
    assert same["metadata"]["uid"] == rc_uid

    # ---- a RoutingPolicy whose pool does not exist: Degraded naming it; recovers when the pool appears
    orphan = copy.deepcopy(next(d for d in docs if d["kind"] == "RoutingPolicy"))
    orphan["metadata"]["name"] = "orphan"
    orphan["spec"]["poolRef"] = "later"
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(orphan))
    degraded = wait(
        lambda: (
            cond(get("routingpolicies", "orphan"), "Degraded").get("status") == "True"
            and cond(get("routingpolicies", "orphan"), "Degraded")
        ),
        timeout=30,
        what="orphan policy Degraded",
    )
    assert degraded["reason"] == "PoolNotFound" and f"ModelPool {ns}/later" in degraded["message"]
    later = copy.deepcopy(next(d for d in docs if d["kind"] == "ModelPool"))
    later["metadata"]["name"] = "later"
    later["spec"]["routingPolicyRef"] = "orphan"
    later["spec"]["gpuClasses"] = [dict(later["spec"]["gpuClasses"][1], replicas=1, minReplicas=1)]
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(later))
    wait(
        lambda: cond(get("routingpolicies", "orphan"), "Degraded").get("status") == "False",
        timeout=60,
        what="orphan policy to recover",
    )
    assert wait(lambda: rayservice("later"), timeout=30, what="RayService later")

    # ---- a pool the operator cannot deploy (unknown target) gets Degraded + a Warning; others carry on
    bad = copy.deepcopy(later)
    bad["metadata"]["name"] = "bad-target"
    bad["metadata"]["annotations"] = {t.TARGET_ANNOTATION: "k8s-jobs"}
    del bad["spec"]["routingPolicyRef"]
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))
    bad_degraded = wait(
        lambda: (
            cond(get("modelpools", "bad-target"), "Degraded").get("status") == "True"
            and cond(get("modelpools", "bad-target"), "Degraded")
        ),
        timeout=30,
        what="bad-target pool Degraded",
    )
    assert bad_degraded["reason"] == "InvalidTarget" and "k8s-jobs" in bad_degraded["message"]
    assert "InvalidTarget" in wait(lambda: events("bad-target"), timeout=20, what="Warning Event")
    assert rayservice("bad-target") is None

    # ---- delete the pool: finalizer runs, RayService (and KubeRay's RayClusters) gone
    assert "corral.dev/finalizer" in (get("modelpools", "llama-8b") or {})["metadata"]["finalizers"]
    k8s_cluster.kubectl("-n", ns, "delete", "modelpool", "llama-8b", "--wait=false")
    wait(lambda: get("modelpools", "llama-8b") is None, timeout=60, what="ModelPool finalized and gone")
    assert rayservice() is None
    wait(lambda: not kuberay.ray_clusters_of(ns, "llama-8b"), timeout=60, what="RayClusters gone")
    assert "RayServiceDeleted" in events("llama-8b")
    op.assert_alive()
