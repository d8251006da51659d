"""Two Ray nodes on this machine, one per GPU class (``ray start --head`` + ``ray start --address``, each
declaring its class's custom resource), and one pool deployed from its Serve config: sim engines of both
classes and two routers, one per node.

Checks what one node cannot show: each class's engines land on the node that declares its resource; the
routers (one on each node) advertise their node's address (not a hard-coded 127.0.0.1) and each sees every
engine, on either node; load samples are judged by when the router received them, so a sample counts while
it is fresh and stops counting ``sample_max_age_s`` later, whatever the engine's own clock says (a sim's
clock is its own simulated time, which stands still while it is idle).

Both nodes run on one machine and so report the same node IP: the test asserts that every advertised host
is the IP Ray reports for the replica's own node, and that replicas of different classes / routers sit on
different node ids. The nodes are started with ``--block`` in their own process groups and stopped by
terminating exactly those groups (``ray stop`` would stop every Ray instance on the machine, including other
test runs). Every wait is a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import requests
from corral.serve.app import PoolPlan, ServeOptions, gpu_class_resource, plan_pool, serve_config
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

T = TypeVar("T")
MODEL = "tiny-llama"
NAMESPACE = "corral-2n"
CLASSES = {"h100": "H100", "a100": "A100-80GB"}
RAY = Path(sys.executable).with_name("ray")

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "twonode"},
    "spec": {
        "models": [{"name": MODEL, "baseModel": "tiny/llama", "engine": "sim"}],
        "gpuClasses": [
            {"name": cls, "gpusPerReplica": 1, "minReplicas": 1, "maxReplicas": 1, "profile": prof}
            for cls, prof in CLASSES.items()
        ],
    },
}
POLICY: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "twonode"},
    "spec": {"poolRef": "twonode"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ports() -> list[str]:
    """Ports of one node's own services: two nodes on one machine must not share them."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")  # fmt: skip
    out = []
    for flag in flags:
        out += [flag, str(_free_port())]
    return out


class TwoNodes:
    """A head node (h100 class) and a worker node (a100 class), each a ``ray start --block`` process
    group of its own."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.procs: list[subprocess.Popen[bytes]] = []
        # Ray's session dir holds AF_UNIX sockets (<= 107 bytes): pytest's tmp paths are too long
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="c2n-", dir="/tmp"))

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", *args, *_node_ports()],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(p)

    def start(self) -> None:
        h = gpu_class_resource("h100")
        a = gpu_class_resource("a100")
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=4", "--include-dashboard=false",
                             f"--temp-dir={self.ray_tmp}", "--ray-client-server-port", str(_free_port()),
                             "--min-worker-port=23000", "--max-worker-port=23499",
                             "--resources", json.dumps({h: 2})])  # fmt: skip
        import ray

        def connect() -> bool:
            for p in self.procs:
                assert p.poll() is None, f"ray start exited {p.returncode}: {self.log_tail()}"
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False)
            return True

        wait_until(connect, 90, "the head node")
        self._start("worker", [f"--address={self.address}", "--num-cpus=4",
                               "--min-worker-port=23500", "--max-worker-port=23999",
                               "--resources", json.dumps({a: 2})])  # fmt: skip

        def joined() -> bool:
            assert self.procs[1].poll() is None, f"worker node exited: {self.log_tail()}"
            return len(self.nodes()) == 2

        wait_until(joined, 90, "the second node to join")

    def nodes(self) -> dict[str, dict[str, Any]]:
        import ray

        return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
            for f in sorted(self.tmp.glob("*.log"))
        )

    def stop(self) -> None:
        """Terminate our two node process groups (and only them); kill what is left after a grace."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:  # the ray start process and its raylet/agents share the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _plan() -> PoolPlan:
    opts = ServeOptions(
        namespace=NAMESPACE,
        router_replicas=2,
        router_host="0.0.0.0",  # advertised as the node's IP, never as the wildcard or loopback
        router_grpc_port=0,  # ephemeral ports: two routers on one machine cannot share fixed ones
        router_http_port=0,
        router_num_cpus=0.2,
        engine_num_cpus=0.1,
        health_check_period_s=2.0,
        sim_time_scale=4.0,  # the engines' clocks run 4x: far from any router's clock within seconds
        heartbeat_s=1.0,
    )
    plan = plan_pool(copy.deepcopy(POOL), copy.deepcopy(POLICY), opts)
    plan.router.max_replicas_per_node = 1  # one router on each node
    return plan


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwoNodes, PoolPlan]]:
    pytest.importorskip("corral.serve.endpoint.sim")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    nodes = TwoNodes(tmp_path_factory.mktemp("two-nodes"))
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this driver talks to the nodes started above
    plan = _plan()
    try:
        nodes.start()
        serve.start(proxy_location="Disabled")
        client = _get_global_client()
        assert client is not None
        client.deploy_apps(ServeDeploySchema.model_validate(serve_config(plan, proxy_location="Disabled")))

        def deployed() -> bool:
            app = serve.status().applications.get(plan.app_name)
            assert app is None or not str(app.status).endswith("DEPLOY_FAILED"), app and app.message
            return app is not None and str(app.status).endswith("RUNNING")

        wait_until(deployed, 300, f"{plan.app_name} RUNNING")
        wait_until(lambda: len(engines()) == 2 and len(routers()) == 2, 60, "registry records")
        yield nodes, plan
    except BaseException:
        sys.stderr.write(nodes.log_tail() + "\n")
        raise
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        nodes.stop()
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


def engines() -> list[dict[str, Any]]:
    import ray
    from corral.serve.registry import get_registry

    return list(ray.get(get_registry(NAMESPACE, create=False).list_engines.remote("twonode"), timeout=10)[1])


def routers() -> list[dict[str, Any]]:
    import ray
    from corral.serve.registry import get_registry

    return list(ray.get(get_registry(NAMESPACE, create=False).list_routers.remote("twonode"), timeout=10))


def dry_run(grpc_address: str, prompt: str) -> Any:
    from corral.v1 import router_pb2, router_pb2_grpc

    req = router_pb2.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=2)
    with grpc.insecure_channel(grpc_address) as ch:
        return router_pb2_grpc.RouterStub(ch).Explain(router_pb2.ExplainRequest(request=req), timeout=10)


def _host(address: str) -> str:
    return address.rsplit("://", 1)[-1].rsplit(":", 1)[0]


# ---- tests -------------------------------------------------------------------------------------------


def test_each_class_runs_on_the_node_that_declares_it(cluster: tuple[TwoNodes, PoolPlan]) -> None:
    nodes, _ = cluster
    alive = nodes.nodes()
    recs = engines()
    assert sorted(r["gpu_class"] for r in recs) == ["a100", "h100"]
    for r in recs:
        node = alive[r["node_id"]]
        assert node["Resources"].get(gpu_class_resource(r["gpu_class"])) == 2.0, (r, node["Resources"])
        assert _host(r["address"]) == node["NodeManagerAddress"]  # engines advertise their node's IP
    assert len({r["node_id"] for r in recs}) == 2


def test_one_router_per_node_advertising_its_node_address(cluster: tuple[TwoNodes, PoolPlan]) -> None:
    nodes, _ = cluster
    alive = nodes.nodes()
    rs = routers()
    assert {r["node_id"] for r in rs} == set(alive)  # max_replicas_per_node=1: one on each node
    for r in rs:
        ip = alive[r["node_id"]]["NodeManagerAddress"]
        assert _host(r["grpc"]) == ip and _host(r["http"]) == ip, r  # bound 0.0.0.0, advertised as the node
        if not ip.startswith("127."):
            assert not _host(r["grpc"]).startswith("127."), r


def test_routers_on_both_nodes_see_and_reach_every_engine(cluster: tuple[TwoNodes, PoolPlan]) -> None:
    want = {r["replica_id"] for r in engines()}
    for r in routers():

        def sees_all(r: dict[str, Any] = r) -> bool:
            ex = dry_run(r["grpc"], "which replicas do you see?")  # over the advertised address
            return {c.replica_id for c in ex.candidates} == want

        wait_until(sees_all, 30, f"router {r['router_id']} to see {sorted(want)}")
        resp = requests.post(
            r["http"] + "/v1/completions",
            json={"model": MODEL, "prompt": "hello from " + r["router_id"], "max_tokens": 3},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-corral-replica"] in want


_SAMPLE_VIEWS = """
import json, sys, time
import ray
from ray import serve

address, namespace, app, timeout, want = sys.argv[1:6]
ray.init(address=address, namespace=namespace, log_to_driver=False)
handle = serve.get_deployment_handle("router", app_name=app)
want, views, deadline = set(json.loads(want)), {}, time.monotonic() + float(timeout)
while len(views) < 2 and time.monotonic() < deadline:
    v = handle.sample_view.remote(6.0).result(timeout_s=30)  # calls spread over the two router replicas
    reps = v["replicas"]
    old_enough = v["now"] > v["max_age_s"] + 1  # the router has run longer than the max age
    if old_enough and set(reps) == want and all(x["fresh"] for x in reps.values()):
        views[v["router_id"]] = v
    else:
        time.sleep(0.2)
print(json.dumps(views))
"""


def test_load_samples_age_on_each_routers_own_clock(cluster: tuple[TwoNodes, PoolPlan]) -> None:
    """Each router counts an engine's sample while it is fresh on the router's clock and stops counting
    it ``sample_max_age_s`` later. The sims stamp samples with their own simulated time (it stands still
    while a sim is idle and runs 4x while it works), which, compared with the router's clock as before,
    made idle sims' samples stale for good once a router had run ``sample_max_age_s`` (the ``fresh``
    check, taken after that) and busy sims' samples fresh for ever (the ``fresh_later`` check)."""
    nodes, plan = cluster
    want = sorted(r["replica_id"] for r in engines())
    # Asked from a fresh driver process: a Serve handle in this process, after an earlier test's Ray
    # cluster in the same pytest session, times out resolving replicas (Ray driver-side state).
    args = [nodes.address, NAMESPACE, plan.app_name, "90", json.dumps(want)]
    out = subprocess.run(
        [sys.executable, "-c", _SAMPLE_VIEWS, *args],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    views: dict[str, dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(views) == 2, f"both routers holding fresh samples of both engines: {views}"
    assert {v["node_id"] for v in views.values()} == {r["node_id"] for r in routers()}
    for v in views.values():
        assert v["max_age_s"] == 5.0  # the shipped policy's sample_max_age_s
        for rid, x in v["replicas"].items():
            assert 0.0 <= x["age_s"] < 2.0, (v["router_id"], rid, x)  # engines sample every 0.1 s
            assert not x["fresh_later"], (v["router_id"], rid, x)  # 6 s on, past the 5 s max age
