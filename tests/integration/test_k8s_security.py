"""The security wiring against a real kube-apiserver: the RayService the operator makes with TLS Secrets and
a tenants' keys Secret mounted (strict field validation, KubeRay's CRD schema) is accepted; the Secret
layouts it expects (kubernetes.io/tls with ca.crt, an Opaque key file made by `corral keys add`) are
accepted as Secrets."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.bench.certs import make_certs
from corral.router.server.auth import append_key, load_key_file
from kuberay_testkit import install_kuberay_crds

pytestmark = pytest.mark.integration

t = pytest.importorskip("corral.operator.translate")
EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _b64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_rayservice_with_tls_and_key_secrets_is_accepted(
    k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    install_kuberay_crds(k8s_cluster)
    crds = Path(__file__).resolve().parents[2] / "manifests" / "crds"
    k8s_cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=corral-tests", "-f", str(crds)
    )
    k8s_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/modelpools.corral.dev",
                        "crd/routingpolicies.corral.dev", timeout=90)  # fmt: skip
    k8s_cluster.dynamic.resources.invalidate_cache()
    certs = make_certs(tmp_path / "certs")
    keys = tmp_path / "keys.yaml"
    append_key(keys, "tenant-a")
    tls = {"tls.crt": _b64(certs.server_cert), "tls.key": _b64(certs.server_key), "ca.crt": _b64(certs.ca)}
    secret = {"apiVersion": "v1", "kind": "Secret"}
    secrets = [
        {**secret, "metadata": {"name": "llama-keys"}, "type": "Opaque", "data": {"api-keys": _b64(keys)}},
        {**secret, "metadata": {"name": "router-tls"}, "type": "kubernetes.io/tls", "data": tls},
    ]
    for s in secrets:
        res = k8s_cluster.create(s, k8s_namespace)
        assert res.status == 201, res.message
    pool = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    policy = yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text())
    policy["spec"]["tenants"] = {"secretRef": {"name": "llama-keys"}, "isolateCache": True}
    pool["spec"]["adapters"][0]["tenant"] = "tenant-a"
    for obj in (pool, policy):  # the CRs themselves, with a private adapter and tenants
        assert k8s_cluster.create(obj, k8s_namespace, dry_run=True).status == 201
    opts = t.RayServiceOptions(
        router_tls_secret="router-tls", router_client_auth=True, engine_tls_secret="router-tls"
    )
    rs = t.ray_service(pool, policy, opts)
    res = k8s_cluster.create(rs, k8s_namespace, dry_run=True)
    assert res.status == 201, res.message
    head = res.body["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in head["volumes"]} == {"llama-keys", "router-tls"}
    # what the routers will read is what `corral keys add` wrote
    stored = k8s_cluster.resource("v1", "Secret").get(name="llama-keys", namespace=k8s_namespace)
    (tmp_path / "mounted").write_bytes(base64.b64decode(stored.data["api-keys"]))
    assert len(load_key_file(tmp_path / "mounted").principals) == 1
