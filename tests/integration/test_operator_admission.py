"""The operator's validating admission webhook against the real apiserver (``corral operator run --webhook``).

The operator serves the webhook with a self-signed certificate on loopback and kopf registers it in the
ValidatingWebhookConfiguration ``corral.dev``; the apiserver then calls it for every ModelPool and
RoutingPolicy write. ``kubectl apply`` of a RoutingPolicy pinning an adapter the pool does not have, or
of a second policy for a pool, is denied with exactly the lines ``corral validate`` prints for the same
files (after its ``file:`` prefix); valid objects are admitted. When the operator stops, kopf removes
its webhooks again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kuberay_testkit
import pytest
import yaml
from kubernetes import client
from operator_testkit import Operator, free_port

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
WEBHOOKS = "corral.dev"


def _pool(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "tiny", "namespace": ns, "annotations": {"corral.dev/target": "ray"}},
        "spec": {
            "models": [{"name": "m", "baseModel": "org/m", "engine": "sim"}],
            "gpuClasses": [{"name": "cpu", "minReplicas": 1, "maxReplicas": 1}],
            "adapters": [{"name": "sql", "baseModel": "m", "source": "file:///adapters/sql"}],
        },
    }


def _policy(ns: str, name: str, pins: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"poolRef": "tiny", "adapterPaging": {"pin": pins}},
    }


@pytest.fixture
def webhook_operator(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[Operator]:
    kuberay_testkit.install_corral_crds(k8s_cluster)
    port = free_port()
    log = k8s_cluster.run_dir / "logs" / f"corral-operator-webhook-{k8s_namespace}.log"
    cmd = [sys.executable, "-m", "corral.api.cli", "operator", "run", "-n", k8s_namespace, "-v",
           "--webhook", "--webhook-port", str(free_port()),
           "--liveness", f"http://127.0.0.1:{port}/healthz"]  # fmt: skip
    op = Operator(cmd, {**os.environ, "KUBECONFIG": str(k8s_cluster.kubeconfig)}, log, port)
    with op.running(k8s_cluster.wait_until, 60):
        yield op


def _corral_validate(tmp: Path, docs: dict[str, dict[str, Any]]) -> list[str]:
    """``corral validate`` of the docs, one file each: its problem lines without the file prefix."""
    for name, doc in docs.items():
        (tmp / name).write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "corral.api.cli", "validate", "-q", str(tmp)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    return [line.split(": ", 1)[1] for line in out.stdout.splitlines()]


def test_webhook_denies_what_corral_validate_finds(
    k8s_cluster: K8sCluster, k8s_namespace: str, webhook_operator: Operator, tmp_path: Path
) -> None:
    ns, wait = k8s_namespace, k8s_cluster.wait_until
    adm = client.AdmissionregistrationV1Api(k8s_cluster.api_client)
    port = webhook_operator.cmd[webhook_operator.cmd.index("--webhook-port") + 1]

    def registered() -> Any:
        webhook_operator.assert_alive()
        cfg = adm.read_validating_webhook_configuration(WEBHOOKS)
        hooks = cfg.webhooks or []
        urls = [h.client_config.url or "" for h in hooks]
        return len(hooks) == 2 and all(f"https://127.0.0.1:{port}/" in u for u in urls) and cfg

    cfg = wait(registered, timeout=30, what="kopf to register the webhooks")
    assert {h.failure_policy for h in cfg.webhooks} == {"Ignore"}
    assert all(h.client_config.ca_bundle for h in cfg.webhooks)  # the self-signed certificate

    pool, good = _pool(ns), _policy(ns, "tiny", ["sql"])
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([pool, good]))  # admitted

    # a pin naming an adapter the pool does not have: denied by the apiserver, in corral validate's words
    bad = _policy(ns, "tiny", ["sql", "nope"])
    (tmp_path / "a").mkdir()
    want = _corral_validate(tmp_path / "a", {"pool.yaml": pool, "policy.yaml": bad})
    assert want == ['RoutingPolicy/tiny: spec.adapterPaging.pin[1]: must name an adapter of ModelPool "tiny" '
                    '(got "nope")']  # fmt: skip
    out = k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert out.returncode != 0
    assert "denied the request" in out.stderr and want[0] in out.stderr, out.stderr
    custom = client.CustomObjectsApi(k8s_cluster.api_client)
    stored = custom.get_namespaced_custom_object("corral.dev", "v1alpha1", ns, "routingpolicies", "tiny")
    assert stored["spec"]["adapterPaging"]["pin"] == ["sql"]

    # a second policy for the pool
    (tmp_path / "b").mkdir()
    second = _policy(ns, "other", [])
    want = _corral_validate(tmp_path / "b", {"a-pool.yaml": pool, "b-rp.yaml": good, "c-rp.yaml": second})
    assert want and all(w.startswith("RoutingPolicy/other: ") for w in want)
    out = k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(second), check=False)
    assert out.returncode != 0 and all(w in out.stderr for w in want), out.stderr

    # a pool change that drops the pinned adapter: the policy's problem, denied on the pool
    shrunk = {**pool, "spec": {**pool["spec"], "adapters": []}}
    out = k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(shrunk), check=False)
    assert out.returncode != 0 and 'pin[0]: must name an adapter of ModelPool "tiny"' in out.stderr

    # the operator gone, its webhooks go with it (kopf's cleanup); writes are not blocked
    webhook_operator.stop()
    hooks = adm.read_validating_webhook_configuration(WEBHOOKS).webhooks or []
    assert hooks == []
    k8s_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(second))
