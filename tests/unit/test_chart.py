"""The Helm chart (charts/corral): generated files in sync, values schema, rendered objects.

Generated from operator/corral/operator/chart_values.py (``python -m corral.operator.chart_values``):
values.yaml, values.schema.json, the README's values table, templates/crds/ (from manifests/crds);
manifests/install.yaml is ``helm template`` of the defaults (``scripts/render-install.sh`` writes all).
The ``helm`` binary comes from e2e/cluster/build.sh's bin dir (skipped without it, failed under CI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chart_testkit
import pytest
import yaml
from corral.operator import chart_values
from corral.operator.chart_values import Values

REPO = Path(__file__).resolve().parents[2]
FIX = "run scripts/render-install.sh"


def test_generated_chart_files_are_in_sync() -> None:
    files = chart_values.render_all(chart_testkit.CHART)
    assert len(files) >= 5
    for path, text in files.items():
        assert path.exists(), f"{path} missing: {FIX}"
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: {FIX}"
    # no stray CRD templates
    crd_templates = {p.name for p in (chart_testkit.CHART / "templates" / "crds").glob("*.yaml")}
    assert crd_templates == {name for _src, name, _cond in chart_values._crd_sources()}


def test_values_yaml_is_the_models_defaults_and_every_leaf_is_annotated() -> None:
    text = (chart_testkit.CHART / "values.yaml").read_text()
    assert yaml.safe_load(text) == Values().model_dump(by_alias=True, exclude={"global_"})
    leaves = list(chart_values._leaves(Values))
    assert text.count("# -- ") == len(leaves) > 40
    assert all(desc for _k, _a, _d, desc in leaves)
    readme = (chart_testkit.CHART / "README.md").read_text()
    for key, *_ in leaves:
        assert f"| {key} |" in readme


def test_install_yaml_is_the_default_render() -> None:
    assert chart_testkit.INSTALL_YAML.read_text() == chart_testkit.render_install_yaml(), (
        f"manifests/install.yaml is stale: {FIX}"
    )


def test_lint() -> None:
    out = chart_testkit.helm("lint", "--strict", str(chart_testkit.CHART))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "operator.target=kuberay"], "/operator/target"),
        (["--set", "operator.replicas=two"], "/operator/replicas"),
        (["--set", "operator.replicas=30"], "/operator/replicas"),
        (["--set", "operatr.verbose=true"], "additional properties 'operatr' not allowed"),
        (["--set", "router.service.grpcPort=70000"], "/router/service/grpcPort"),
        (["--set", "webhook.port=0"], "/webhook/port"),
    ],
)
def test_bad_values_fail_with_the_path(args: list[str], message: str) -> None:
    proc = chart_testkit.helm("template", "x", str(chart_testkit.CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def _by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_crds_are_the_committed_ones_and_kept_by_default() -> None:
    crds = _by_kind(chart_testkit.template(), "CustomResourceDefinition")
    committed: dict[str, Any] = {
        d["metadata"]["name"]: d
        for p in sorted(chart_values.CRD_DIR.glob("*.yaml"))
        for d in [yaml.safe_load(p.read_text())]
    }
    assert {c["metadata"]["name"] for c in crds} == set(committed)
    for crd in crds:
        assert crd["spec"] == committed[crd["metadata"]["name"]]["spec"]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not _by_kind(chart_testkit.template("--set", "crds.install=false"), "CustomResourceDefinition")
    for crd in _by_kind(chart_testkit.template("--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_operator_deployment_is_locked_down() -> None:
    objs = chart_testkit.template()
    dep = _by_kind(objs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert f"--liveness=http://0.0.0.0:{port}/healthz" in c["args"]
    assert c["args"][:2] == ["operator", "run"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # read-only root: a writable /tmp


def test_operator_arguments_parse_with_the_real_cli() -> None:
    """The rendered args are accepted by ``corral operator run``'s parser (with every optional value)."""
    import argparse

    from corral.operator import cli

    objs = chart_testkit.template(
        "--set", "operator.target=ray,operator.rayAddress=http://ray-head:8265,operator.verbose=true",
        "--set-json", 'operator.serveOptions={"router_grpc_port":50051}',
        "--set", "operator.watchNamespaces={a}",
    )  # fmt: skip
    args = _by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    ns = parser.parse_args(args)
    assert ns.target == "ray" and ns.ray_address == "http://ray-head:8265" and ns.verbose
    assert ns.namespace == ["a"] and json.loads(ns.serve_options) == {"router_grpc_port": 50051}
    assert ns.image == "ghcr.io/corral-dev/corral-ray:0.1.0"
    cli._options(ns)  # the serve options are real ServeOptions fields


def test_router_service_ports_and_servicemonitor() -> None:
    objs = chart_testkit.template("--set", "serviceMonitor.enabled=true")
    (svc,) = _by_kind(objs, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc", "http", "metrics"}
    assert ports["metrics"]["targetPort"] == ports["http"]["targetPort"]
    assert svc["spec"]["selector"] == {"corral.dev/pool": "llama-8b"}
    (sm,) = _by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert all(sm["spec"]["selector"]["matchLabels"][k] == v for k, v in svc["metadata"]["labels"].items()
               if k in sm["spec"]["selector"]["matchLabels"])  # fmt: skip
    assert not _by_kind(chart_testkit.template(), "ServiceMonitor")
    objs = chart_testkit.template("--set", "router.service.namespace=default,serviceMonitor.enabled=true")
    assert {o["metadata"]["namespace"] for o in objs if o["kind"] in ("Service", "ServiceMonitor")} == {
        "default"
    }
    test_pod = chart_testkit.helm(
        "template", "corral", str(chart_testkit.CHART), "--set", "router.service.namespace=default"
    ).stdout
    assert "http://corral-router.default.svc:8080/v1/models" in test_pod


def test_helm_test_hook_curls_the_router() -> None:
    out = chart_testkit.helm("template", "x", str(chart_testkit.CHART), "--namespace", "ns").stdout
    pods = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Pod"]
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["args"][-1] == "http://x-corral-router.ns.svc:8080/v1/models"


def _operator(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(_by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"])


def test_webhook_self_signed_and_cert_manager() -> None:
    """The operator serves and registers the webhook (kopf manages the configurations named
    admission.WEBHOOK_CONFIGURATION); the chart gives it a Service, a certificate, and the empty
    configurations so that uninstall removes them."""
    import base64
    import ssl

    from corral.operator.admission import WEBHOOK_CONFIGURATION

    assert not _by_kind(chart_testkit.template(), "ValidatingWebhookConfiguration")
    objs = chart_testkit.template("--set", "webhook.enabled=true")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        (cfg,) = _by_kind(objs, kind)
        assert cfg["metadata"]["name"] == WEBHOOK_CONFIGURATION and "webhooks" not in cfg
    (secret,) = _by_kind(objs, "Secret")
    pem = base64.b64decode(secret["data"]["tls.crt"]).decode()
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and base64.b64decode(secret["data"]["tls.key"])
    ssl.PEM_cert_to_DER_cert(pem)
    svc = next(o for o in _by_kind(objs, "Service") if o["metadata"]["name"] == "corral-webhook")
    assert svc["spec"]["ports"][0]["port"] == 9443
    pod = _operator(objs)
    args = pod["containers"][0]["args"]
    assert "--webhook" in args and "--webhook-host=corral-webhook.corral-system.svc" in args
    assert "--webhook-certfile=/etc/corral/webhook/tls.crt" in args and "--webhook-listen=0.0.0.0" in args
    assert {"name": "webhook-tls", "secret": {"secretName": secret["metadata"]["name"]}} in pod["volumes"]

    objs = chart_testkit.template("--set", "webhook.enabled=true,webhook.certManager.enabled=true")
    assert not _by_kind(objs, "Secret")
    (cert,) = _by_kind(objs, "Certificate")
    assert cert["spec"]["issuerRef"]["kind"] == "Issuer" and _by_kind(objs, "Issuer")
    assert "corral-webhook.corral-system.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["secretName"] == "corral-webhook-tls"


def test_peering_needs_its_crds_and_allows_replicas() -> None:
    objs = chart_testkit.template("--set", "operator.peering.enabled=true,operator.replicas=2")
    crds = {c["metadata"]["name"] for c in _by_kind(objs, "CustomResourceDefinition")}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= crds
    dep = _by_kind(objs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    crds = {c["metadata"]["name"] for c in _by_kind(chart_testkit.template(), "CustomResourceDefinition")}
    assert crds == {"modelpools.corral.dev", "routingpolicies.corral.dev"}
    proc = chart_testkit.helm(
        "template", "x", str(chart_testkit.CHART), "--set", "operator.replicas=2", check=False
    )
    assert proc.returncode != 0 and "needs operator.peering.enabled" in proc.stderr


def test_default_routing_policy_is_a_valid_routing_policy() -> None:
    from corral.api.models import RoutingPolicy

    objs = chart_testkit.template("--set", "defaultRoutingPolicy.enabled=true")
    (policy,) = _by_kind(objs, "RoutingPolicy")
    RoutingPolicy.model_validate(policy)
    assert not _by_kind(chart_testkit.template(), "RoutingPolicy")
