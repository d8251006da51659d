"""The real KubeRay operator against the local control plane (fixture ``kuberay``).

``kuberay`` (session) installs the vendored KubeRay CRDs (``manifests/third_party/kuberay/``, server-side
apply: they are too big for client-side apply) into the ``k8s_cluster`` apiserver and runs the
``ray-operator`` binary that ``e2e/cluster/build.sh`` builds (Go module
``github.com/ray-project/kuberay/ray-operator``, the same version as the CRDs) as a local process with the
cluster's admin kubeconfig, no leader election, and its metrics/probe endpoints on free loopback ports. It
is ready when its ``/readyz`` answers. Its log is ``<run_dir>/logs/ray-operator.log``.

Without the binary the tests skip locally and fail when ``CI`` is set (as the control-plane binaries do).

What cannot happen here: the pods KubeRay creates are bound by kube-scheduler to kwok's fake GPU nodes and
marked Running by kwok, but no container runs, so there is no Ray head and no dashboard behind them.
KubeRay therefore never sees Serve applications and the RayService stays not Ready; everything up to that
point (admission of the objects, RayCluster creation, pods and their placement, KubeRay's in-place vs
new-cluster decisions) is real.

The ``kuberay`` fixture is registered once, in conftest.py (never alias it in a test module: a session
fixture defined in two modules runs twice, and two KubeRay operators fight over the same RayClusters).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import K8sCluster

REPO = Path(__file__).resolve().parents[2]
KUBERAY_CRD_DIR = REPO / "manifests" / "third_party" / "kuberay"
KUBERAY_CRDS = ("rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io")
KUBERAY_READY_TIMEOUT_S = 90
RAY_GROUP, RAY_VERSION = "ray.io", "v1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class KubeRay:
    """A running KubeRay operator process (ours: started and stopped by the fixture)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    probe_port: int
    cluster: K8sCluster

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        rc = self.proc.poll()
        assert rc is None, f"ray-operator exited with {rc}:\n{self.log_tail()}"

    # ------------------------------------------------------------------ reading KubeRay's objects
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.cluster.api_client)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.custom().get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, name)
        return dict(obj)

    def list(self, plural: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        kw = {"label_selector": selector} if selector else {}
        out = self.custom().list_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, **kw)
        return list(out.get("items", []))

    def ray_clusters_of(self, namespace: str, rayservice: str) -> list[dict[str, Any]]:
        """RayClusters KubeRay made for a RayService (label ``ray.io/originated-from-cr-name``)."""
        return self.list("rayclusters", namespace, f"ray.io/originated-from-cr-name={rayservice}")

    def pods_of(self, namespace: str, ray_cluster: str) -> list[Any]:
        from kubernetes import client

        core = client.CoreV1Api(self.cluster.api_client)
        return list(core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={ray_cluster}").items)


def _kuberay_binary(k8s_bin_dir: Path) -> Path:
    path = Path(os.environ.get("KUBERAY_OPERATOR_BIN") or (k8s_bin_dir / "ray-operator"))
    if not os.access(path, os.X_OK):
        msg = (
            f"KubeRay operator binary missing: {path}. Build it with `make k8s-bins` "
            "(e2e/cluster/build.sh; ~3-5 min on 2 cores with a cold Go build cache)."
        )
        if _ci():
            pytest.fail(f"CI is set, refusing to skip: {msg}", pytrace=False)
        pytest.skip(msg)
    return path


def install_kuberay_crds(cluster: K8sCluster) -> None:
    """Server-side apply of the vendored CRDs, then wait until the apiserver serves them."""
    crds = str(KUBERAY_CRD_DIR)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=corral-tests", "-f", crds)
    names = (f"crd/{c}" for c in KUBERAY_CRDS)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names, timeout=90)


@pytest.fixture(scope="session")
def kuberay(k8s_cluster: K8sCluster, k8s_bin_dir: Path) -> Iterator[KubeRay]:
    """KubeRay's CRDs installed and its operator running against the local apiserver (see module doc)."""
    binary = _kuberay_binary(k8s_bin_dir)
    install_kuberay_crds(k8s_cluster)
    log_dir = k8s_cluster.run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "ray-operator.log"
    probe_port, metrics_port = _free_port(), _free_port()
    cmd = [
        str(binary),
        f"-kubeconfig={k8s_cluster.kubeconfig}",
        "-enable-leader-election=false",
        f"-metrics-addr=127.0.0.1:{metrics_port}",
        f"-health-probe-bind-address=127.0.0.1:{probe_port}",
        "-log-stdout-encoder=console",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    kr = KubeRay(proc=proc, log_path=log_path, probe_port=probe_port, cluster=k8s_cluster)
    try:
        t0 = time.monotonic()

        def ready() -> bool:
            kr.assert_alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)

        k8s_cluster.wait_until(ready, timeout=KUBERAY_READY_TIMEOUT_S, what="KubeRay operator /readyz")
        import sys

        sys.stderr.write(f"\n[kuberay] ray-operator ready in {time.monotonic() - t0:.1f}s (log {log_path})\n")
        yield kr
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


CORRAL_CRD_DIR = REPO / "manifests" / "crds"
CORRAL_CRDS = ("modelpools.corral.dev", "routingpolicies.corral.dev")


def install_corral_crds(cluster: K8sCluster) -> None:
    """Corral's own CRDs (manifests/crds), server-side applied; waits until they are served."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=corral-tests",
        "-f",
        str(CORRAL_CRD_DIR),
    )
    names = (f"crd/{c}" for c in CORRAL_CRDS)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names, timeout=90)
