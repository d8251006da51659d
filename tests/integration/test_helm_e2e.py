"""End-to-end: the README's "Kubernetes quick start (Helm)", step by step, on a fresh local control plane.

A private cluster (``e2e/cluster/up.sh``: etcd, kube-apiserver with RBAC, KCM, scheduler, kwok GPU nodes)
with the real KubeRay operator, then the commands of :data:`QUICK_START` exactly as the README lists them
(``tests`` checks the README's block is this list), each followed by what must hold:

lint -> server-side dry-run of the rendered chart (the apiserver's own validation: schemas of the built-in
kinds, the CRDs' structural schemas, RBAC objects; stronger than an offline schema validator, which has no
schemas here) -> install -> the operator -> apply the examples -> the RayService, KubeRay's RayCluster and
the pool's status conditions -> upgrade with a changed value -> delete the examples (finalized by the
operator) -> uninstall leaves nothing but the kept CRDs -> a second install with ``crds.keep=false``
whose uninstall removes the CRDs too.

Pods cannot run images here (kwok fakes the kubelets), so the chart's operator Deployment is scheduled and
marked Ready but runs nothing. The operator instead runs as a local process with the args of the rendered
Deployment, authenticated as the chart's ServiceAccount (a TokenRequest token in its own kubeconfig), so
anything the chart's RBAC lacks fails here: kopf's 403 warnings and API errors are asserted absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CLUSTER_SCRIPTS, K8sCluster
from kubernetes import client
from operator_testkit import Operator, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
NS, RELEASE = "corral-system", "corral"
QS_BEGIN, QS_END = "<!-- HELM-QUICKSTART:BEGIN -->", "<!-- HELM-QUICKSTART:END -->"

# The README's quick start, verbatim (after KubeRay is installed). `kubectl`/`helm` are the built ones.
QUICK_START = {
    "namespace": "kubectl create namespace corral-system",
    "lint": "helm lint --strict charts/corral",
    "validate": (
        "helm template corral charts/corral --namespace corral-system | kubectl apply --dry-run=server -f -"
    ),
    "install": (
        "helm install corral charts/corral --namespace corral-system "
        "--set router.service.namespace=default --wait --timeout 90s"
    ),
    "apply": "kubectl apply -f manifests/examples/",
    "wait": "kubectl wait --for=create rayservice/llama-8b --timeout=60s",
    "doctor": "corral doctor",
    "status": "kubectl get modelpools,routingpolicies,rayservices,rayclusters",
    "upgrade": (
        "helm upgrade corral charts/corral --namespace corral-system --reuse-values "
        "--set operator.verbose=true --set router.service.type=NodePort --wait --timeout 90s"
    ),
    "delete": "kubectl delete -f manifests/examples/ --timeout=60s",
    "uninstall": "helm uninstall corral --namespace corral-system --wait --timeout 60s",
}


def readme_quick_start() -> list[str]:
    """The command lines of the README's Helm quick start block (comments and blanks dropped)."""
    text = README.read_text()
    block = text.split(QS_BEGIN, 1)[1].split(QS_END, 1)[0]
    lines = []
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "```")):
            lines.append(line)
    return lines


def test_readme_quick_start_is_what_this_test_runs() -> None:
    assert readme_quick_start() == list(QUICK_START.values())


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fresh_cluster(k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sCluster]:
    """A private control plane (the session's shared one has other tests' CRDs and operators)."""
    from kubernetes import config

    run_dir = tmp_path_factory.mktemp("helm-e2e")
    env = {
        **os.environ,
        "K8S_BIN_DIR": str(k8s_bin_dir),
        "K8S_RUN_DIR": str(run_dir),
        "K8S_OWNER_PID": str(os.getpid()),
        "PYTHON": sys.executable,
    }
    t0 = time.monotonic()
    up = subprocess.run(
        ["bash", str(CLUSTER_SCRIPTS / "up.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    if up.returncode != 0:
        pytest.fail(f"up.sh failed (logs {run_dir}/logs):\n{up.stderr}", pytrace=False)
    kubeconfig = run_dir / "admin.kubeconfig"
    api = config.new_client_from_config(config_file=str(kubeconfig))
    cluster = K8sCluster(run_dir, kubeconfig, k8s_bin_dir, time.monotonic() - t0, api)
    try:
        yield cluster
    finally:
        api.close()
        keep = os.environ.get("CORRAL_K8S_KEEP") == "1"
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / "down.sh"), str(run_dir)],
            env={**env, "KEEP_RUN_DIR": "1" if keep else "0"},
            capture_output=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def fresh_kuberay(fresh_cluster: K8sCluster, k8s_bin_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """KubeRay as a user has it before the quick start: its CRDs and its operator (a local process)."""
    import kuberay_testkit

    binary = k8s_bin_dir / "ray-operator"
    if not os.access(binary, os.X_OK):
        msg = f"KubeRay operator binary missing: {binary} (make k8s-bins)"
        if kuberay_testkit._ci():
            pytest.fail(f"CI is set, refusing to skip: {msg}", pytrace=False)
        pytest.skip(msg)
    kuberay_testkit.install_kuberay_crds(fresh_cluster)
    probe = free_port()
    log = fresh_cluster.run_dir / "logs" / "ray-operator.log"
    cmd = [
        str(binary),
        f"-kubeconfig={fresh_cluster.kubeconfig}",
        "-enable-leader-election=false",
        f"-metrics-addr=127.0.0.1:{free_port()}",
        f"-health-probe-bind-address=127.0.0.1:{probe}",
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        assert proc.poll() is None, f"ray-operator exited {proc.returncode}"
        with urllib.request.urlopen(f"http://127.0.0.1:{probe}/readyz", timeout=2) as r:
            return bool(r.status == 200)

    try:
        fresh_cluster.wait_until(ready, timeout=90, what="KubeRay /readyz")
        # The Deployment KubeRay's own chart creates (what `corral doctor` looks for): kwok marks it
        # available; the controller itself is the local process above.
        fresh_cluster.kubectl("create", "namespace", "kuberay-system")
        fresh_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(KUBERAY_DEPLOYMENT))
        fresh_cluster.kubectl(
            "-n",
            "kuberay-system",
            "rollout",
            "status",
            "deployment/kuberay-operator",
            "--timeout=60s",
            timeout=90,
        )
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


KUBERAY_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "kuberay-operator",
        "namespace": "kuberay-system",
        "labels": {"app.kubernetes.io/name": "kuberay-operator"},
    },
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "kuberay-operator"}},
            "spec": {
                "containers": [{"name": "kuberay-operator", "image": "quay.io/kuberay/operator:v1.5.0"}]
            },
        },
    },
}


class LocalOperator(Operator):
    """``corral operator run`` with the rendered Deployment's args, as the chart's ServiceAccount."""

    def __init__(self, cluster: K8sCluster, args: list[str]) -> None:
        self.cluster = cluster
        port = free_port()
        args = [a for a in args if not a.startswith("--liveness=")]
        cmd = [sys.executable, "-m", "corral.api.cli", *args, f"--liveness=http://127.0.0.1:{port}/healthz"]
        super().__init__(cmd, {}, cluster.run_dir / "logs" / "corral-operator-sa.log", port)

    def start_as(self, kubeconfig: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.start(self.cluster.wait_until)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assert_no_rbac_gap(self) -> None:
        text = self.text()
        for bad in ("Forbidden", "forbidden", "Not enough permissions", " 403"):
            assert bad not in text, f"RBAC gap ({bad!r}) in the operator log:\n{text[-6000:]}"


def sa_kubeconfig(cluster: K8sCluster, sa: str, path: Path) -> Path:
    """A kubeconfig for ServiceAccount ``sa`` (TokenRequest API via ``kubectl create token``)."""
    token = cluster.kubectl("create", "token", sa, "-n", NS, "--duration=3600s").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    cl = admin["clusters"][0]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cl["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "local", "user": sa, "namespace": NS}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------------------------------ the e2e


def test_helm_quick_start_end_to_end(
    fresh_cluster: K8sCluster, fresh_kuberay: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    cluster, wait = fresh_cluster, fresh_cluster.wait_until
    bin_path = f"{cluster.bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**cluster.env, "PATH": bin_path}
    timings: dict[str, float] = {}

    def step(name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", QUICK_START[name]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        timings[name] = round(time.monotonic() - t0, 1)
        if check:
            assert proc.returncode == 0, (
                f"{QUICK_START[name]} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    custom: Any = client.CustomObjectsApi(cluster.api_client)
    apps: Any = client.AppsV1Api(cluster.api_client)
    core: Any = client.CoreV1Api(cluster.api_client)
    rbac: Any = client.RbacAuthorizationV1Api(cluster.api_client)
    ext: Any = client.ApiextensionsV1Api(cluster.api_client)

    def get(group: str, plural: str, name: str, ns: str = "default") -> dict[str, Any] | None:
        try:
            return dict(
                custom.get_namespaced_custom_object(
                    group, "v1alpha1" if group == "corral.dev" else "v1", ns, plural, name
                )
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
        return next(
            (c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {}
        )

    def crds() -> set[str]:
        return {
            c.metadata.name
            for c in ext.list_custom_resource_definition().items
            if c.metadata.name.endswith("corral.dev")
        }

    def release_objects() -> list[str]:
        sel = f"app.kubernetes.io/instance={RELEASE}"
        found = [
            f"Deployment/{d.metadata.name}"
            for d in apps.list_namespaced_deployment(NS, label_selector=sel).items
        ]
        found += [
            f"Service/{s.metadata.name}" for s in core.list_namespaced_service(NS, label_selector=sel).items
        ]
        found += [
            f"SA/{s.metadata.name}"
            for s in core.list_namespaced_service_account(NS, label_selector=sel).items
        ]
        found += [f"ClusterRole/{r.metadata.name}" for r in rbac.list_cluster_role(label_selector=sel).items]
        found += [f"CRB/{r.metadata.name}" for r in rbac.list_cluster_role_binding(label_selector=sel).items]
        found += [
            f"Secret/{s.metadata.name}"
            for s in core.list_namespaced_secret(NS).items
            if s.type.startswith("helm.sh")
        ]
        return found

    # ---- corral doctor on the fresh cluster (KubeRay only): broken, saying what is missing and the fix
    t0 = time.monotonic()
    broken = subprocess.run(
        [sys.executable, "-m", "corral.api.cli", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    timings["doctor-broken"] = round(time.monotonic() - t0, 1)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    out = broken.stdout
    assert "FAIL  crds      CRD modelpools.corral.dev is not installed" in out, out
    assert "FAIL  operator  no Corral operator Deployment" in out, out
    assert "fix: helm install corral charts/corral" in out, out
    assert "ok    kuberay   KubeRay operator kuberay-system/kuberay-operator v1.5.0 available" in out, out
    assert "broken: 3 failed" in out, out

    # ---- lint, validate against the apiserver, install
    step("namespace")
    assert "0 chart(s) failed" in step("lint").stdout
    out = step("validate").stdout
    assert "(server dry run)" in out and "deployment.apps/corral-operator created (server dry run)" in out
    assert crds() == set(), "dry run must not create anything"
    # manifests/install.yaml (for users without Helm) passes the same server-side validation
    plain = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", str(REPO / "manifests" / "install.yaml")
    )
    assert "deployment.apps/corral-operator serverside-applied (server dry run)" in plain.stdout, plain.stdout
    step("install")
    assert crds() == {"modelpools.corral.dev", "routingpolicies.corral.dev"}
    dep = apps.read_namespaced_deployment("corral-operator", NS)
    assert dep.status.ready_replicas == 1  # a kwok pod: scheduled and Ready, runs nothing
    (container,) = dep.spec.template.spec.containers
    assert container.args[:2] == ["operator", "run"]

    # ---- the operator as the chart's ServiceAccount: every API call goes through the chart's RBAC
    op = LocalOperator(cluster, container.args)
    try:
        op.start_as(
            sa_kubeconfig(cluster, dep.spec.template.spec.service_account_name, tmp_path / "sa.kubeconfig")
        )
        step("apply")
        step("wait")
        healthy = step("doctor").stdout  # exit 0
        sys.stderr.write(f"\n[helm e2e] corral doctor (healthy):\n{healthy}\n[broken]:\n{broken.stdout}\n")
        assert "healthy: 0 failed" in healthy, healthy
        assert "ok    crds      CRD modelpools.corral.dev (v1alpha1) matches this Corral" in healthy
        assert "ok    operator  Corral operator corral-system/corral-operator" in healthy
        assert "class h100" in healthy and "16 nvidia.com/gpu on 2 nodes (wants 4)" in healthy, healthy
        rs = get("ray.io", "rayservices", "llama-8b")
        assert rs is not None and rs["metadata"]["labels"]["corral.dev/pool"] == "llama-8b"
        assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"
        ] == ("ghcr.io/corral-dev/corral-ray:0.1.0")  # the chart's --image
        wait(
            lambda: custom.list_namespaced_custom_object("ray.io", "v1", "default", "rayclusters")["items"],
            timeout=60,
            what="KubeRay's RayCluster",
        )

        def pool_status() -> dict[str, Any] | None:
            p = get("corral.dev", "modelpools", "llama-8b")
            return (
                p
                if p and (p.get("status") or {}).get("observedGeneration") == p["metadata"]["generation"]
                else None
            )

        pool = wait(pool_status, timeout=60, what="pool status at its generation")
        assert cond(pool, "Progressing")["status"] == "True" and cond(pool, "Degraded")["status"] == "False"
        assert cond(pool, "Ready")["status"] == "False"  # no Ray behind kwok's pods
        policy = wait(
            lambda: (
                cond(get("corral.dev", "routingpolicies", "llama-8b"), "Degraded").get("status") == "False"
                and get("corral.dev", "routingpolicies", "llama-8b")
            ),
            timeout=60,
            what="RoutingPolicy status",
        )
        assert policy
        # the router Service (in the pool's namespace) selects the pool's Ray pods
        discovery: Any = client.DiscoveryV1Api(cluster.api_client)

        def pods() -> set[str]:
            items = core.list_namespaced_pod("default", label_selector="corral.dev/pool=llama-8b").items
            return {p.metadata.name for p in items}

        def router_endpoints() -> set[str]:
            slices = discovery.list_namespaced_endpoint_slice(
                "default", label_selector="kubernetes.io/service-name=corral-router"
            ).items
            return {e.target_ref.name for sl in slices for e in sl.endpoints or [] if e.target_ref}

        wait(
            lambda: len(pods()) == 7 and router_endpoints() == pods(),
            timeout=60,
            what="router Service endpoints = the pool's pods",
        )
        status = step("status").stdout
        assert "llama-8b" in status and "rayservice.ray.io/llama-8b" in status
        events = core.list_namespaced_event("default", field_selector="involvedObject.name=llama-8b").items
        assert "RayServiceCreated" in {e.reason for e in events}  # posted with the SA's events/create

        # ---- upgrade with changed values
        step("upgrade")
        dep = apps.read_namespaced_deployment("corral-operator", NS)
        assert "--verbose" in dep.spec.template.spec.containers[0].args
        assert (
            core.read_namespaced_service("corral-router", "default").spec.type == "NodePort"
        )  # reused values
        assert dep.metadata.annotations["deployment.kubernetes.io/revision"] == "2"

        # ---- delete the examples while the operator runs: its finalizer removes the RayService
        step("delete")
        wait(lambda: get("ray.io", "rayservices", "llama-8b") is None, timeout=60, what="RayService deleted")
        assert get("corral.dev", "modelpools", "llama-8b") is None
        op.assert_alive()
        op.assert_no_rbac_gap()
    finally:
        op.stop()
        sys.stderr.write(f"\n[helm e2e] operator log tail:\n{op.text()[-3000:]}\n")

    # ---- uninstall: nothing left but the kept CRDs
    step("uninstall")
    assert release_objects() == []
    assert crds() == {"modelpools.corral.dev", "routingpolicies.corral.dev"}  # crds.keep=true

    # ---- crds.keep=false: the CRDs go with the release (Helm adopts the kept ones: same release)
    chart = str(REPO / "charts" / "corral")
    cluster.helm(
        "install", RELEASE, chart, "-n", NS, "--set", "crds.keep=false", "--wait", "--timeout", "90s"
    )
    cluster.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s")
    wait(lambda: crds() == set(), timeout=60, what="CRDs removed (crds.keep=false)")
    assert release_objects() == []
    sys.stderr.write(f"\n[helm e2e] step seconds: {json.dumps(timings)}\n")
