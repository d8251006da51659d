"""Two ``corral operator run --peering corral`` replicas against the real apiserver do not fight (kopf
peering through the KopfPeering CRD vendored in manifests/third_party/kopf/).

The replica with the higher priority works, the other one pauses. ``kubectl apply`` of the example pool
and policy -> exactly one RayService, made by the active replica; over a window that lasts until both
replicas have renewed their peering keep-alive and the active one's status timer has run again, no
object changes (resourceVersions stable). The active replica is killed (SIGKILL: no goodbye) -> the
other resumes once its keep-alive expires (``--peering-lifetime``) -> a later RoutingPolicy edit is
reconciled by it (same RayService). The test installs only the KubeRay CRDs; the session's KubeRay operator
may be running (started by another test), which writes RayService statuses the pool's status follows:
such legitimate changes just move the window on.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
import yaml
from kubernetes import client
from operator_testkit import REPO, Operator, examples, free_port

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
PEERING = "corral"
LIFETIME_S = 8


@pytest.fixture
def two_operators(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[tuple[Operator, Operator]]:
    kuberay_testkit.install_corral_crds(k8s_cluster)
    kuberay_testkit.install_kuberay_crds(k8s_cluster)
    k8s_cluster.kubectl("apply", "-f", str(REPO / "manifests" / "third_party" / "kopf"))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/kopfpeerings.kopf.dev", "crd/clusterkopfpeerings.kopf.dev", timeout=90,
    )  # fmt: skip
    ops = []
    for name, priority in (("a", 200), ("b", 100)):
        port = free_port()
        log = k8s_cluster.run_dir / "logs" / f"corral-operator-{name}-{k8s_namespace}.log"
        cmd = [sys.executable, "-m", "corral.api.cli", "operator", "run", "-n", k8s_namespace, "-v",
               "--peering", PEERING, "--priority", str(priority), "--peering-lifetime", str(LIFETIME_S),
               "--liveness", f"http://127.0.0.1:{port}/healthz"]  # fmt: skip
        ops.append(Operator(cmd, {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}, log, port))
    try:
        for op in ops:
            op.start(k8s_cluster.wait_until)
        yield ops[0], ops[1]
    finally:
        for op, name in zip(ops, "ab", strict=True):
            if op.log.exists():
                sys.stderr.write(f"\n[corral operator {name}] log tail ({op.log}):\n{op.tail(40)}\n")
            op.stop()


def test_two_replicas_one_works_the_other_takes_over(
    k8s_cluster: K8sCluster, k8s_namespace: str, two_operators: tuple[Operator, Operator]
) -> None:
    ns, wait = k8s_namespace, k8s_cluster.wait_until
    active, standby = two_operators
    custom = client.CustomObjectsApi(k8s_cluster.api_client)

    def get(plural: str, name: str, group: str = "corral.dev", version: str = "v1alpha1") -> Any:
        return custom.get_namespaced_custom_object(group, version, ns, plural, name)

    def rayservices() -> list[dict[str, Any]]:
        return list(custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"])

    # both start paused (kopf, mandatory peering) until they see the peers: the higher priority resumes,
    # the lower one stays paused (or pauses again if it resumed before the other's first keep-alive)
    resumed, paused = "Resuming operations after the pause", "Pausing operations in favour of"

    def settled() -> bool:
        active.assert_alive()
        peers = get("kopfpeerings", PEERING, "kopf.dev", "v1").get("status") or {}
        return (
            sorted(p["priority"] for p in peers.values()) == [100, 200]
            and active.count(resumed) >= 1
            and standby.count(resumed) == standby.count(paused)
        )

    wait(settled, timeout=30, what="the peers to see each other")

    docs = examples(ns)
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    gen = wait(lambda: get("modelpools", "llama-8b"), timeout=10, what="pool")["metadata"]["generation"]
    wait(
        lambda: (get("modelpools", "llama-8b").get("status") or {}).get("observedGeneration") == gen,
        timeout=60,
        what="pool status written",
    )
    wait(
        lambda: (get("routingpolicies", "llama-8b").get("status") or {}).get("observedGeneration") == 1,
        timeout=60,
        what="policy status written",
    )
    (rs,) = rayservices()
    assert active.count("Handler 'pool_changed") >= 1
    assert standby.count("Handler '") == 0  # the paused replica ran no handler

    # ---- nothing flaps: a window lasting until both replicas renewed their keep-alive and the status
    # timer ran again sees no resourceVersion change. (When the session's KubeRay operator runs, it writes
    # the RayService's status and the timer mirrors it into the pool's: a window with such a change is
    # followed by another; fighting replicas would change something in every window.)
    def versions() -> tuple[str, ...]:
        return tuple(
            o["metadata"]["resourceVersion"]
            for o in (get("modelpools", "llama-8b"), get("routingpolicies", "llama-8b"), *rayservices())
        )

    def quiet_window() -> bool:
        before = versions()
        start = datetime.datetime.now(datetime.UTC)
        timers = active.count("Timer 'pool_status_refresh' succeeded")

        def over() -> bool:
            status = get("kopfpeerings", PEERING, "kopf.dev", "v1")["status"]
            seen = [datetime.datetime.fromisoformat(p["lastseen"]) for p in status.values()]
            renewed = len(seen) == 2 and all(s > start for s in seen)
            return renewed and active.count("Timer 'pool_status_refresh' succeeded") > timers

        wait(over, timeout=40, what="both keep-alives renewed and the status timer run")
        return versions() == before

    assert any(quiet_window() for _ in range(3)), "resourceVersions changed in 3 windows in a row"
    (same,) = rayservices()
    assert same["metadata"]["generation"] == rs["metadata"]["generation"]  # its spec never rewritten
    assert standby.count("Handler '") == 0 and standby.count("Timer '") == 0

    # ---- the active replica dies without a goodbye: the standby takes over after its keep-alive expires
    assert active.proc is not None
    active.proc.kill()
    active.proc.wait(10)
    standby_resumed = standby.count(resumed)
    wait(
        lambda: standby.count(resumed) > standby_resumed,
        timeout=LIFETIME_S + 20,
        what="standby to resume",
    )
    k8s_cluster.kubectl(
        "-n", ns, "patch", "routingpolicy", "llama-8b", "--type=merge",
        "-p", '{"spec":{"strategy":"least_loaded"}}',
    )  # fmt: skip
    wait(
        lambda: "least_loaded" in rayservices()[0]["spec"]["serveConfigV2"],
        timeout=30,
        what="the policy edit reconciled by the former standby",
    )
    (after,) = rayservices()
    assert after["metadata"]["uid"] == rs["metadata"]["uid"]
    assert standby.count("Handler 'policy_changed") >= 1
    standby.assert_alive()
