"""Target ``ray``: the Corral operator deploys a ModelPool to an existing, real Ray cluster through the
dashboard's Serve REST API (``PUT /api/serve/applications/``), against the real apiserver.

A local Ray head (``ray start --head --block`` with its dashboard on loopback, its own temp dir and ports,
declaring one GPU class resource) runs the sim engines. ``kubectl apply`` of a ModelPool annotated
``corral.dev/target: ray`` + its RoutingPolicy -> the Serve application is RUNNING and the pool Ready ->
the router (found at ``<Serve HTTP>/corral/<pool id>``, the application's route) answers OpenAI requests
for the base model and an adapter, and the operator's timer writes ``status.adapterResidency`` from it
(the pinned adapter on every engine replica) -> editing the RoutingPolicy changes the routers'
``user_config`` only: same engine replicas (no restart), and ``corral explain --router`` (a dry run)
shows the new policy -> ``kubectl delete`` of the pool removes the application. No KubeRay is involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
import yaml
from corral.serve.app import gpu_class_resource, pool_id_of
from kubernetes import client
from operator_testkit import Operator, free_port

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
RAY = Path(sys.executable).with_name("ray")
SERVE_OPTIONS = {
    "router_host": "127.0.0.1",
    "router_grpc_port": 0,
    "router_http_port": 0,
    "router_num_cpus": 0.2,
    "engine_num_cpus": 0.1,
    "health_check_period_s": 2.0,
}


class RayHead:
    """``ray start --head --block`` in a process group of its own, stopped by terminating that group."""

    def __init__(self, tmp: Path) -> None:
        self.log = tmp / "ray-head.log"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        # Ray's session dir holds AF_UNIX sockets (<= 107 bytes): pytest's tmp paths are too long
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="crt-", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: Any) -> None:
        ports: list[str] = []
        for flag in ("--port", "--node-manager-port", "--object-manager-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                     "--runtime-env-agent-port", "--ray-client-server-port"):  # fmt: skip
            ports += [flag, str(free_port())]
        cmd = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", f"--temp-dir={self.ray_tmp}",
               "--min-worker-port=24000", "--max-worker-port=24499",
               "--resources", json.dumps({gpu_class_resource("cpu"): 2}), *ports]  # fmt: skip
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"ray start exited:\n{self.tail()}"
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                return bool(r.status == 200)

        wait(up, timeout=120, what="the Ray dashboard")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""

    def serve(self, declarative: bool = False) -> dict[str, Any]:
        q = "?api_type=declarative" if declarative else ""
        with urllib.request.urlopen(f"{self.dashboard}/api/serve/applications/{q}", timeout=10) as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        p = self.proc
        if p is not None:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture
def ray_head(k8s_cluster: K8sCluster, tmp_path: Path) -> Iterator[RayHead]:
    pytest.importorskip("corral.serve.endpoint.sim")
    head = RayHead(tmp_path)
    try:
        head.start(k8s_cluster.wait_until)
        yield head
    finally:
        head.stop()


@pytest.fixture
def ray_operator(k8s_cluster: K8sCluster, k8s_namespace: str, ray_head: RayHead) -> Iterator[Operator]:
    kuberay_testkit.install_corral_crds(k8s_cluster)
    port = free_port()
    log = k8s_cluster.run_dir / "logs" / f"corral-operator-ray-{k8s_namespace}.log"
    cmd = [sys.executable, "-m", "corral.api.cli", "operator", "run", "-n", k8s_namespace, "-v",
           "--target", "ray", "--ray-address", ray_head.dashboard, "--http-port", str(free_port()),
           "--serve-options", json.dumps(SERVE_OPTIONS),
           "--liveness", f"http://127.0.0.1:{port}/healthz"]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}
    op = Operator(cmd, env, log, port)
    try:
        with op.running(k8s_cluster.wait_until, 120):
            yield op
    finally:
        sys.stderr.write(f"\n[ray head] log tail:\n{ray_head.tail()}\n")


def test_operator_deploys_to_an_existing_ray_cluster(
    k8s_cluster: K8sCluster, k8s_namespace: str, ray_head: RayHead, ray_operator: Operator
) -> None:
    ns, op, wait = k8s_namespace, ray_operator, k8s_cluster.wait_until
    custom = client.CustomObjectsApi(k8s_cluster.api_client)
    pool = {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "tiny", "namespace": ns, "annotations": {"corral.dev/target": "ray"}},
        "spec": {
            "routingPolicyRef": "tiny",
            "models": [
                {"name": "tiny-llama", "baseModel": "tiny/llama", "engine": "sim", "maxModelLen": 4096}
            ],
            "gpuClasses": [
                {"name": "cpu", "minReplicas": 1, "maxReplicas": 2, "replicas": 2, "profile": "H100"}
            ],
            "adapters": [
                {"name": n, "baseModel": "tiny-llama", "source": f"file:///adapters/{n}"}
                for n in ("sql", "chat")
            ],
        },
    }
    policy = {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "tiny", "namespace": ns},
        "spec": {"poolRef": "tiny", "strategy": "corral", "adapterPaging": {"pin": ["sql"]}},
    }
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([pool, policy]))
    app = f"corral-{ns}.tiny"

    def app_state() -> dict[str, Any] | None:
        op.assert_alive()
        got = ray_head.serve().get("applications", {}).get(app)
        assert not got or got.get("status") != "DEPLOY_FAILED", got and got.get("message")
        return got

    state = wait(lambda: (s := app_state()) and s.get("status") == "RUNNING" and s, timeout=300, what=app)
    engine = "engine-tiny-llama-cpu"
    replicas = {r["replica_id"] for r in state["deployments"][engine]["replicas"]}
    assert len(replicas) == 2

    def pool_ready() -> bool:
        p = custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "modelpools", "tiny")
        conds = {c["type"]: c for c in (p.get("status") or {}).get("conditions") or []}
        return conds.get("Ready", {}).get("status") == "True"

    wait(pool_ready, timeout=60, what="pool Ready (Serve application RUNNING)")

    def policy_ready() -> bool:
        p = custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "routingpolicies", "tiny")
        conds = {c["type"]: c for c in (p.get("status") or {}).get("conditions") or []}
        return conds.get("Ready", {}).get("status") == "True"

    wait(policy_ready, timeout=30, what="policy Ready with its pool")

    # ---- the router, found through the application's route on Serve's HTTP proxy, answers requests
    serve_http = f"http://127.0.0.1:{op.cmd[op.cmd.index('--http-port') + 1]}"

    def router_view() -> dict[str, Any]:
        with urllib.request.urlopen(f"{serve_http}/corral/{pool_id_of(pool)}", timeout=5) as r:
            return dict(json.loads(r.read()))

    view = wait(lambda: (v := router_view()) and len(v["replicas"]) == 2 and v, timeout=60, what="router")
    for model in ("tiny-llama", "chat"):
        body = json.dumps({"model": model, "prompt": "hello corral " * 8, "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"{view['http']}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["model"] == model and answer["choices"][0]["text"], answer

    # ---- adapter residency read back from the router by the operator's timer: "sql" is pinned (on every
    # engine replica's GPU), "chat" was loaded for the request above
    def residency() -> dict[str, Any] | None:
        p = custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "modelpools", "tiny")
        rows = {a["name"]: a for a in (p.get("status") or {}).get("adapterResidency") or []}
        ok = len(rows.get("sql", {}).get("gpuReplicas") or []) == 2 and rows["chat"].get("gpuReplicas")
        return rows if ok else None

    rows = wait(residency, timeout=60, what="status.adapterResidency: sql on both replicas, chat loaded")
    assert set(rows["sql"]["gpuReplicas"]) == set(router_view()["replicas"])

    def explain() -> str:
        out = subprocess.run(
            [sys.executable, "-m", "corral.api.cli", "explain", "--router", view["grpc"],
             "--model", "tiny-llama", "--prompt", "hello corral"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    # a replica whose event stream went quiet for stale_after_s (a loaded CI machine) is out of the fleet
    # until it reconnects: the dry run is retried on that transient UNAVAILABLE, other failures fail at once
    def explain_ready() -> str | None:
        try:
            return explain()
        except AssertionError as e:
            if "no healthy replica" in str(e):
                return None
            raise

    first = wait(explain_ready, timeout=60, what="corral explain (dry run)")
    assert "dry run" in first and "policy corral ->" in first, first

    # ---- RoutingPolicy edit: the routers' user_config, live; the engines keep their replicas
    k8s_cluster.kubectl(
        "-n",
        ns,
        "patch",
        "routingpolicy",
        "tiny",
        "--type=merge",
        "-p",
        '{"spec":{"strategy":"least_loaded"}}',
    )

    def router_strategy() -> str | None:
        cfg = ray_head.serve(declarative=True)["applications"][app]["deployed_app_config"]
        router = next(d for d in cfg["deployments"] if d["name"] == "router")
        return str(router["user_config"]["policy"]["strategy"])

    wait(lambda: router_strategy() == "least_loaded", timeout=60, what="the new policy in the Serve config")
    state = wait(lambda: (s := app_state()) and s.get("status") == "RUNNING" and s, timeout=120, what=app)
    assert {r["replica_id"] for r in state["deployments"][engine]["replicas"]} == replicas
    # live in the running router (same address: the router was reconfigured, not restarted)
    new_policy = "policy least_loaded ->"
    wait(lambda: new_policy in (explain_ready() or ""), timeout=60, what="corral explain: the new policy")
    assert router_view()["grpc"] == view["grpc"]

    # ---- delete the pool: the application goes, the finalizer is removed
    k8s_cluster.kubectl("-n", ns, "delete", "modelpool", "tiny", "--wait=false")
    wait(lambda: app not in ray_head.serve().get("applications", {}), timeout=120, what=f"{app} removed")

    def pool_gone() -> bool:
        try:
            custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "modelpools", "tiny")
        except client.ApiException as exc:
            return exc.status == 404
        return False

    wait(pool_gone, timeout=30, what="ModelPool finalized")
    op.assert_alive()
