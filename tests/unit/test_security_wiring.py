"""Security settings wired through the deployment path: the operator mounts the TLS Secrets (as folders,
so renewals reach the pods) next to the tenants' keys Secret and points the routers and engines at them;
`corral operator run` flags and the chart values carry the Secret names; a private adapter's tenant
reaches the router settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

t = pytest.importorskip("corral.operator.translate")

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _crs() -> tuple[dict[str, Any], dict[str, Any]]:
    pool = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    policy = yaml.safe_load((EXAMPLES / "routingpolicy.yaml").read_text())
    policy["spec"]["tenants"] = {"secretRef": {"name": "llama-keys"}, "isolateCache": True}
    return pool, policy


def test_operator_mounts_tls_secrets_and_points_serve_at_them() -> None:
    pool, policy = _crs()
    opts = t.RayServiceOptions(
        router_tls_secret="router-tls", router_client_auth=True, engine_tls_secret="eng-tls"
    )
    rs = t.ray_service(pool, policy, opts)
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for tmpl in templates:
        vols = {v["name"]: v["secret"]["secretName"] for v in tmpl["spec"]["volumes"]}
        assert vols == {
            t.API_KEYS_VOLUME: "llama-keys",
            "corral-router-tls": "router-tls",
            "corral-engine-tls": "eng-tls",
        }
        mounts = {m["mountPath"] for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
        assert mounts == {t.API_KEYS_DIR, t.ROUTER_TLS_DIR, t.ENGINE_TLS_DIR}
        assert all("subPath" not in m for m in tmpl["spec"]["containers"][0]["volumeMounts"])
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    o = app["args"]["options"]
    assert (o["router_tls_dir"], o["router_client_auth"], o["engine_tls_dir"]) == (
        t.ROUTER_TLS_DIR,
        True,
        t.ENGINE_TLS_DIR,
    )
    assert o["api_keys_file"] == f"{t.API_KEYS_DIR}/api-keys"
    # without TLS Secrets nothing TLS is mounted or configured
    plain = t.ray_service(pool, policy, t.RayServiceOptions())
    head = plain["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert [v["name"] for v in head["volumes"]] == [t.API_KEYS_VOLUME]
    o = yaml.safe_load(plain["spec"]["serveConfigV2"])["applications"][0]["args"]["options"]
    assert o["router_tls_dir"] is None and o["engine_tls_dir"] is None


def test_operator_cli_flags_reach_the_options() -> None:
    from corral.operator import cli

    p = argparse.ArgumentParser()
    cli._rayservice_arguments(p)
    ns = p.parse_args(["--router-tls-secret", "r", "--router-client-auth", "--engine-tls-secret", "e"])
    o = cli._options(ns)
    assert (o.router_tls_secret, o.router_client_auth, o.engine_tls_secret) == ("r", True, "e")


def test_chart_values_carry_the_tls_secrets() -> None:
    from corral.operator.chart_values import Values

    v = Values().model_dump()
    assert v["operator"]["tls"] == {"routerSecret": "", "routerClientAuth": False, "engineSecret": ""}
    tmpl = (Path(__file__).resolve().parents[2] / "charts/corral/templates/deployment.yaml").read_text()
    for flag in ("--router-tls-secret=", "--router-client-auth", "--engine-tls-secret="):
        assert flag in tmpl


def test_private_adapter_tenant_reaches_router_settings() -> None:
    from corral.api.modelpool import ModelPool
    from corral.router.settings import router_settings

    pool, _ = _crs()
    pool["spec"]["adapters"][0]["tenant"] = "acme"
    s = router_settings(None, ModelPool.model_validate(pool))
    name = pool["spec"]["adapters"][0]["name"]
    assert s.adapters[name].tenant == "acme"
    assert all(a.tenant is None for n, a in s.adapters.items() if n != name)


def test_chart_renders_tls_flags_and_an_authorised_https_scrape() -> None:
    import chart_testkit

    sets = ",".join(
        [
            "operator.tls.routerSecret=router-tls",
            "operator.tls.routerClientAuth=true",
            "operator.tls.engineSecret=eng-tls",
            "serviceMonitor.enabled=true",
            "serviceMonitor.adminKeySecret.name=metrics-key",
        ]
    )
    objs = chart_testkit.template("--set", sets)
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--router-tls-secret=router-tls", "--router-client-auth", "--engine-tls-secret=eng-tls"} <= set(
        args
    )
    (sm,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    ep = sm["spec"]["endpoints"][0]
    assert ep["scheme"] == "https" and ep["tlsConfig"]["ca"]["secret"] == {
        "name": "router-tls",
        "key": "ca.crt",
    }
    assert ep["tlsConfig"]["keySecret"] == {"name": "router-tls", "key": "tls.key"}
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "metrics-key", "key": "token"}}
    plain = chart_testkit.template("--set", "serviceMonitor.enabled=true")
    (sm,) = [o for o in plain if o["kind"] == "ServiceMonitor"]
    assert "scheme" not in sm["spec"]["endpoints"][0] and "authorization" not in sm["spec"]["endpoints"][0]
    (dep,) = [o for o in plain if o["kind"] == "Deployment"]
    assert not any("tls" in a for a in dep["spec"]["template"]["spec"]["containers"][0]["args"])


def test_corral_serve_tls_flags_reach_the_serve_config(tmp_path: Path) -> None:
    """``corral serve --tls-dir/--client-auth/--engine-tls-dir`` (checked first: one line naming the folder
    and file) end up in the routers' and engines' arguments."""
    import subprocess
    import sys

    from corral.bench.certs import make_certs

    folder = tmp_path / "tls"
    make_certs(folder)
    cmd = [sys.executable, "-m", "corral.api.cli", "serve", "-f", str(EXAMPLES / "modelpool.yaml"),
           "--print-config"]  # fmt: skip

    def serve(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)

    out = serve("--tls-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "--tls-dir" in out.stderr and "nowhere" in out.stderr and "tls.crt" in out.stderr
    out = serve("--client-auth")
    assert out.returncode == 1 and "--client-auth needs --tls-dir" in out.stderr
    out = serve("--tls-dir", str(folder), "--client-auth", "--engine-tls-dir", str(folder))
    assert out.returncode == 0, out.stderr
    app = yaml.safe_load(out.stdout)["applications"][0]
    o = app["args"]["options"]
    assert (o["router_tls_dir"], o["router_client_auth"], o["engine_tls_dir"]) == (
        str(folder),
        True,
        str(folder),
    )
