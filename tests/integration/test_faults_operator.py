"""Control-plane faults against the real local apiserver (issue 14, part 1): the Corral operator (a real
kopf process, target ``rayservice``) killed with SIGKILL mid-reconcile and restarted, and the
kube-apiserver frozen (SIGSTOP) for 30 s under a running operator.

What must hold: after the restart every pool has exactly one RayService (its own, owned by it, with the
spec of its latest generation) and no RayService is left whose pool is gone; with the apiserver back, the
operator (still alive, not crash-looping) converges on what changed. KubeRay's CRDs are installed but its
operator does not run: the objects under test are the ones the Corral operator writes.

Figures (seconds to converge) are printed and, with ``CORRAL_FAULTS_RECORD=FILE``, recorded (see
faults_testkit.record); nothing here asserts a duration beyond the bounded waits.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
import yaml
from faults_testkit import apiserver_frozen, record
from kubernetes import client
from operator_testkit import Operator, examples, free_port

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

G, V = "corral.dev", "v1alpha1"
POOL_LABEL = "corral.dev/pool"
N_POOLS = 6


def _pools(ns: str, n: int) -> list[dict[str, Any]]:
    """``n`` copies of the example ModelPool + RoutingPolicy, named pool-0 ... pool-(n-1)."""
    pool, policy = (next(d for d in examples(ns) if d["kind"] == k) for k in ("ModelPool", "RoutingPolicy"))
    docs = []
    for i in range(n):
        p, rp = copy.deepcopy(pool), copy.deepcopy(policy)
        p["metadata"]["name"] = rp["metadata"]["name"] = rp["spec"]["poolRef"] = f"pool-{i}"
        if "routingPolicyRef" in p["spec"]:
            p["spec"]["routingPolicyRef"] = f"pool-{i}"
        docs += [p, rp]
    return docs


@pytest.fixture
def operator(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[Operator]:
    """``corral operator run -n <ns>`` as a subprocess (not started: the test starts, kills, restarts it)."""
    kuberay_testkit.install_corral_crds(k8s_cluster)
    kuberay_testkit.install_kuberay_crds(k8s_cluster)
    port = free_port()
    log = k8s_cluster.run_dir / "logs" / f"corral-operator-faults-{k8s_namespace}.log"
    cmd = [sys.executable, "-m", "corral.api.cli", "operator", "run", "-n", k8s_namespace, "-v"]
    cmd += ["--liveness", f"http://127.0.0.1:{port}/healthz"]
    op = Operator(cmd, {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}, log, port)
    try:
        yield op
    finally:
        if log.exists():
            sys.stderr.write(f"\n[corral operator] log tail ({log}):\n{op.tail(80)}\n")
        op.stop()


class View:
    """What the apiserver holds in one namespace: pools and the RayServices labelled with a pool."""

    def __init__(self, cluster: K8sCluster, ns: str) -> None:
        self.custom = client.CustomObjectsApi(cluster.api_client)
        self.ns = ns

    def pools(self) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(G, V, self.ns, "modelpools")["items"]
        return {p["metadata"]["name"]: p for p in items}

    def rayservices(self) -> list[dict[str, Any]]:
        return list(
            self.custom.list_namespaced_custom_object(
                "ray.io", "v1", self.ns, "rayservices", label_selector=POOL_LABEL
            )["items"]
        )

    def converged(self, expect: dict[str, int] | None = None) -> bool:
        """Exactly one RayService per live pool (owned by it, at its current generation's status), none
        for a pool that is gone; ``expect``: pool -> H100 replicas its RayService must carry."""
        pools = {n: p for n, p in self.pools().items() if not p["metadata"].get("deletionTimestamp")}
        by_pool: dict[str, list[dict[str, Any]]] = {}
        for rs in self.rayservices():
            by_pool.setdefault(rs["metadata"]["labels"][POOL_LABEL], []).append(rs)
        if set(by_pool) != set(pools):  # a pool without one, or an orphan
            return False
        for name, rss in by_pool.items():
            assert len(rss) == 1, (
                f"duplicate RayServices for pool {name}: {[r['metadata']['name'] for r in rss]}"
            )
            (owner,) = rss[0]["metadata"]["ownerReferences"]
            assert owner["uid"] == pools[name]["metadata"]["uid"], (name, owner)
            st = pools[name].get("status") or {}
            if st.get("observedGeneration") != pools[name]["metadata"]["generation"]:
                return False
            if any(c["type"] == "Degraded" and c["status"] == "True" for c in st.get("conditions") or []):
                return False  # e.g. its RoutingPolicy not seen yet
            if expect and name in expect and _h100_replicas(rss[0]) != expect[name]:
                return False
        return True


def _h100_replicas(rs: dict[str, Any]) -> int | None:
    for g in rs["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []:
        if "h100" in g["groupName"]:
            return int(g["replicas"])
    return None


def test_operator_killed_mid_reconcile_leaves_no_duplicates_or_orphans(
    k8s_cluster: K8sCluster, k8s_namespace: str, operator: Operator
) -> None:
    ns, wait = k8s_namespace, k8s_cluster.wait_until
    view = View(k8s_cluster, ns)
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_pools(ns, N_POOLS)))
    operator.start(wait)
    # kill it hard as soon as it has written its first RayService: the others are mid-reconcile
    wait(lambda: view.rayservices(), timeout=120, interval=0.02, what="the first RayService")
    assert operator.proc is not None
    operator.proc.kill()
    operator.proc.wait(timeout=10)
    done_before = len(view.rayservices())
    # while it is down: a pool is deleted (its finalizer waits for the operator), another one is scaled
    k8s_cluster.kubectl("-n", ns, "delete", "modelpool", f"pool-{N_POOLS - 1}", "--wait=false")
    k8s_cluster.kubectl("-n", ns, "delete", "routingpolicy", f"pool-{N_POOLS - 1}", "--wait=false")
    k8s_cluster.kubectl(
        "-n", ns, "patch", "modelpool", "pool-0", "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/gpuClasses/0/replicas", "value": 2}]',
    )  # fmt: skip
    t0 = time.monotonic()
    operator.start(wait)
    wait(lambda: view.converged({"pool-0": 2}), timeout=180, what="one RayService per live pool, no orphans")
    converged_s = time.monotonic() - t0
    wait(
        lambda: f"pool-{N_POOLS - 1}" not in view.pools(),
        timeout=60,
        what="the deleted pool's finalizer done",
    )
    assert view.converged({"pool-0": 2})
    names = sorted(rs["metadata"]["name"] for rs in view.rayservices())
    assert len(names) == N_POOLS - 1 == len(set(names))
    operator.assert_alive()
    print(
        f"killed with {done_before}/{N_POOLS} RayServices written; converged {converged_s:.1f}s after restart"
    )
    record("operator_restart_converge_s", converged_s, f"{N_POOLS} pools, SIGKILL mid-reconcile, restart")


def test_apiserver_frozen_30s_operator_backs_off_and_converges(
    k8s_cluster: K8sCluster, k8s_namespace: str, operator: Operator
) -> None:
    ns, wait = k8s_namespace, k8s_cluster.wait_until
    view = View(k8s_cluster, ns)
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_pools(ns, 2)))
    operator.start(wait)
    wait(lambda: view.converged(), timeout=120, what="both pools reconciled")
    # a change in flight when the apiserver freezes (the operator's calls hang on open connections) ...
    k8s_cluster.kubectl(
        "-n", ns, "patch", "modelpool", "pool-0", "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/gpuClasses/0/replicas", "value": 5}]',
    )  # fmt: skip
    with apiserver_frozen(k8s_cluster, 30.0):
        operator.assert_alive()
    operator.assert_alive()  # it rode out 30 s of a silent apiserver
    t0 = time.monotonic()
    # ... and one made right after it is back
    k8s_cluster.kubectl(
        "-n", ns, "patch", "modelpool", "pool-1", "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/gpuClasses/0/replicas", "value": 3}]',
    )  # fmt: skip
    wait(lambda: view.converged({"pool-0": 5, "pool-1": 3}), timeout=180, what="both changes reconciled")
    converged_s = time.monotonic() - t0
    operator.assert_alive()
    print(f"apiserver frozen 30 s; operator converged {converged_s:.1f}s after it came back")
    record(
        "apiserver_frozen_converge_s", converged_s, "kube-apiserver SIGSTOP 30 s, then a change; to converged"
    )
