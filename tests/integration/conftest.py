"""Integration-test fixtures.

Kubernetes (this section): a real local control plane — etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok with fake H100/A100 GPU nodes — started once per session by
``e2e/cluster/up.sh`` on free loopback ports and stopped by ``e2e/cluster/down.sh``.

Fixtures:
  ``k8s_bin_dir``   (session) Path of the built binaries. Skips when they are missing locally; with
                    ``CI`` set it fails instead, so CI never skips the integration tests silently.
  ``k8s_cluster``   (session) a :class:`K8sCluster` (kubeconfig, run_dir, bin_dir, api_client,
                    kubectl()/helm(), dynamic client, wait_until(), namespace helpers).
  ``k8s_namespace`` (function) a fresh namespace whose ``default`` ServiceAccount exists; deleted after.

Environment: ``K8S_BIN_DIR`` (binaries; default ``e2e/cluster/build.sh --print-bin-dir``),
``CORRAL_K8S_KEEP=1`` (keep the run dir with component logs after the session).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPTS = REPO / "e2e" / "cluster"
K8S_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
K8S_UP_TIMEOUT_S = 300
T = TypeVar("T")


def _k8s_bin_dir() -> Path:
    env = os.environ.get("K8S_BIN_DIR")
    if env:
        return Path(env)
    out = subprocess.run(
        ["bash", str(CLUSTER_SCRIPTS / "build.sh"), "--print-bin-dir"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _missing_binaries(bin_dir: Path) -> list[str]:
    missing = [b for b in K8S_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if not (bin_dir / "kwok-stages.yaml").is_file():
        missing.append("kwok-stages.yaml")
    return missing


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    """Directory holding the control-plane binaries (skip locally / fail in CI when absent)."""
    bin_dir = _k8s_bin_dir()
    missing = _missing_binaries(bin_dir)
    if missing:
        msg = (
            f"local Kubernetes binaries missing in {bin_dir}: {', '.join(missing)}. "
            "Build them with `make k8s-bins` (or .ci/build-k8s.sh); a cold build takes ~10 min on 2 cores."
        )
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set, refusing to skip: {msg}", pytrace=False)
        pytest.skip(msg)
    return bin_dir


class K8sError(RuntimeError):
    pass


@dataclass
class ApiResult:
    """A raw apiserver response: HTTP status and the decoded JSON body (a Status object on errors)."""

    status: int
    body: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.body.get("message", ""))


@dataclass
class K8sCluster:
    run_dir: Path
    kubeconfig: Path
    bin_dir: Path
    startup_s: float
    api_client: Any  # kubernetes.client.ApiClient bound to this cluster (the global default is untouched)
    _dynamic: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ processes
    @property
    def env(self) -> dict[str, str]:
        """Environment for tools talking to this cluster (KUBECONFIG; helm state kept in the run dir)."""
        helm_home = self.run_dir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "K8S_RUN_DIR": str(self.run_dir),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def _run(
        self, tool: str, args: tuple[str, ...], *, input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise K8sError(
                f"{tool} {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; raises K8sError on failure when check=True."""
        return self._run("kubectl", args, input=input, check=check, timeout=timeout)

    def kubectl_json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster (its cache/config/data live in the run dir)."""
        return self._run("helm", args, input=input, check=check, timeout=timeout)

    def log_tail(self, component: str, lines: int = 40) -> str:
        path = self.run_dir / "logs" / f"{component}.log"
        if not path.exists():
            return f"(no log {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ API
    @property
    def dynamic(self) -> Any:
        """kubernetes.dynamic.DynamicClient (discovery refreshes itself when a kind is not found)."""
        if self._dynamic is None:
            from kubernetes.dynamic import DynamicClient

            # discovery cache in the run dir (the default is a file per apiserver URL in /tmp)
            self._dynamic = DynamicClient(self.api_client, cache_file=str(self.run_dir / "discovery.json"))
        return self._dynamic

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 60,
    ) -> ApiResult:
        """Raw API call that never raises on HTTP errors: returns status + decoded body.

        Use it to assert on the apiserver's own rejections (status 422, Status.message)."""
        client = self.api_client
        method_, url, headers, body_, post = client.param_serialize(
            method.upper(),
            path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = client.call_api(
            method_, url, header_params=headers, body=body_, post_params=post, _request_timeout=timeout
        )
        raw = resp.read()
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)}
        return ApiResult(resp.status, decoded if isinstance(decoded, dict) else {"items": decoded})

    def resource(self, api_version: str, kind: str) -> Any:
        """Discovered resource (dynamic client), e.g. resource('corral.dev/v1alpha1', 'ModelPool')."""
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def create(
        self,
        obj: dict[str, Any],
        namespace: str | None = None,
        *,
        field_validation: str = "Strict",
        dry_run: bool = False,
    ) -> ApiResult:
        """POST an object as kubectl would (fieldValidation=Strict by default); never raises on 4xx.

        Namespaced objects go to ``namespace`` (overriding metadata.namespace)."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        body = json.loads(json.dumps(obj))
        ns = None
        if res.namespaced:
            ns = namespace or body.get("metadata", {}).get("namespace") or "default"
            body.setdefault("metadata", {})["namespace"] = ns
        query = [("fieldValidation", field_validation), ("fieldManager", "corral-tests")]
        if dry_run:
            query.append(("dryRun", "All"))
        return self.request("POST", res.path(namespace=ns), body, query=query)

    def apply(
        self,
        obj: dict[str, Any],
        namespace: str | None = None,
        *,
        field_validation: str = "Strict",
        force: bool = True,
        dry_run: bool = False,
    ) -> ApiResult:
        """Server-side apply (field manager ``corral-tests``), like ``kubectl apply --server-side``.

        Creates or updates; never raises on 4xx. Namespaced objects go to ``namespace`` (overriding
        metadata.namespace)."""
        res = self.resource(obj["apiVersion"], obj["kind"])
        body = json.loads(json.dumps(obj))
        ns = None
        if res.namespaced:
            ns = namespace or body.get("metadata", {}).get("namespace") or "default"
            body.setdefault("metadata", {})["namespace"] = ns
        query = [("fieldValidation", field_validation), ("fieldManager", "corral-tests")]
        if force:
            query.append(("force", "true"))
        if dry_run:
            query.append(("dryRun", "All"))
        path = res.path(name=body["metadata"]["name"], namespace=ns)
        # JSON is valid YAML: send it as a pre-serialised string so the client does not re-encode it
        return self.request(
            "PATCH", path, json.dumps(body), query=query, content_type="application/apply-patch+yaml"
        )

    # ------------------------------------------------------------------ waiting
    @staticmethod
    def wait_until(
        fn: Callable[[], T | None], *, timeout: float = 60, interval: float = 0.2, what: str = "condition"
    ) -> T:
        """Poll ``fn`` until it returns a truthy value (returned); K8sError after ``timeout`` seconds.

        Exceptions from ``fn`` count as "not yet" (the last one is reported on timeout), except
        AssertionError, which is final and propagates at once."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            try:
                value = fn()
                if value:
                    return value
                last_exc = None
            except AssertionError:
                raise
            except Exception as exc:  # not ready yet (404, connection refused, ...)
                last_exc = exc
            if time.monotonic() >= deadline:
                raise K8sError(
                    f"timed out after {timeout}s waiting for {what}"
                    + (f"; last error: {last_exc!r}" if last_exc else "")
                )
            time.sleep(interval)

    # ------------------------------------------------------------------ namespaces
    def create_namespace(self, prefix: str = "t", *, timeout: float = 60) -> str:
        """Create a uniquely named namespace and wait for its ``default`` ServiceAccount (pods need it)."""
        from kubernetes import client

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        core = client.CoreV1Api(self.api_client)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        self.wait_until(
            lambda: core.read_namespaced_service_account("default", name),
            timeout=timeout,
            what=f"ServiceAccount {name}/default (kube-controller-manager)",
        )
        return name

    def delete_namespace(self, name: str, *, wait: bool = False, timeout: float = 120) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client)
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        if wait:

            def gone() -> bool:
                try:
                    core.read_namespace(name)
                except ApiException as exc:
                    if exc.status == 404:
                        return True
                    raise
                return False

            self.wait_until(gone, timeout=timeout, what=f"namespace {name} to be deleted")


@pytest.fixture(scope="session")
def k8s_cluster(k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sCluster]:
    """A real local control plane for the whole session (see module docstring)."""
    from kubernetes import config

    for tool in ("bash", "openssl", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is needed to start the local control plane", pytrace=False)
    run_dir = tmp_path_factory.mktemp("k8s")
    env = {
        **os.environ,
        "K8S_BIN_DIR": str(k8s_bin_dir),
        "K8S_RUN_DIR": str(run_dir),
        "K8S_OWNER_PID": str(os.getpid()),  # watchdog: no orphaned cluster if pytest is killed hard
        "PYTHON": sys.executable,
    }
    t0 = time.monotonic()
    try:
        up = subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / "up.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=K8S_UP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / "down.sh"), str(run_dir)], env={**env, "KEEP_RUN_DIR": "1"}
        )
        pytest.fail(
            f"e2e/cluster/up.sh did not finish in {K8S_UP_TIMEOUT_S}s (logs: {run_dir}/logs)\n"
            f"{exc.stderr or ''}",
            pytrace=False,
        )
    if up.returncode != 0:
        pytest.fail(
            f"e2e/cluster/up.sh failed (exit {up.returncode}); logs kept in {run_dir}/logs\n{up.stderr}",
            pytrace=False,
        )
    startup_s = time.monotonic() - t0
    kubeconfig = run_dir / "admin.kubeconfig"
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    cluster = K8sCluster(
        run_dir=run_dir,
        kubeconfig=kubeconfig,
        bin_dir=k8s_bin_dir,
        startup_s=startup_s,
        api_client=api_client,
    )
    sys.stderr.write(f"\n[k8s_cluster] local control plane up in {startup_s:.1f}s ({run_dir})\n")
    try:
        yield cluster
    finally:
        api_client.close()
        keep = os.environ.get("CORRAL_K8S_KEEP") == "1"
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / "down.sh"), str(run_dir)],
            env={**env, "KEEP_RUN_DIR": "1" if keep else "0"},
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def k8s_namespace(k8s_cluster: K8sCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (default ServiceAccount present); deleted after the test (not waited for:
    KCM's namespace controller waits a fixed 5 s before it even starts, ~10 s with a 30 s-grace pod)."""
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") or "t"
    name = k8s_cluster.create_namespace(prefix)
    try:
        yield name
    finally:
        k8s_cluster.delete_namespace(name)


# KubeRay's operator, once per session: registered here only. (A session fixture aliased in two test modules
# is two fixtures to pytest: two KubeRay operators reconciled the same RayClusters and made duplicate pods.)
from kuberay_testkit import kuberay  # noqa: E402,F401


@pytest.fixture
def spans() -> Any:
    """The spans this test exports, collected in memory (OpenTelemetry SDK provider installed once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()
