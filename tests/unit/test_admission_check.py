"""The admission webhook's check (:func:`corral.operator.admission.check` via
:func:`corral.api.validation.admission_problems`) is ``corral validate``'s cross-object check: same problems,
same words; only problems a change adds count. And the self-signed certificate fits the webhook host."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from corral.api.validation import admission_problems, cross_problems, load_object

pytest.importorskip("kopf")

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
    "spec": {
        "models": [{"name": "m", "baseModel": "org/m", "engine": "sim"}],
        "gpuClasses": [{"name": "cpu", "minReplicas": 1, "maxReplicas": 1}],
        "adapters": [{"name": "sql", "baseModel": "m", "source": "file:///a"}],
    },
    "status": {"conditions": [{"type": "Ready", "status": "True", "whatever": 1}]},  # ignored
}


def policy(name: str, pins: list[str], pool: str = "p") -> Any:
    doc = {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"poolRef": pool, "adapterPaging": {"pin": pins}},
    }
    obj = load_object(doc)
    assert obj is not None
    return obj


def test_a_change_is_judged_by_the_problems_it_adds() -> None:
    pool = load_object(POOL)
    assert pool is not None  # live objects (uid, status) load
    good, bad = policy("r", ["sql"]), policy("r", ["sql", "x"])
    assert admission_problems(good, [pool]) == []
    (problem,) = admission_problems(bad, [pool])
    assert (
        str(problem)
        == 'RoutingPolicy/r: spec.adapterPaging.pin[1]: must name an adapter of ModelPool "p" (got "x")'
    )
    assert problem == cross_problems([(pool, ""), (bad, "")])[0]  # exactly corral validate's check
    # a second policy for the pool; an update of the first does not count against it
    (dup,) = admission_problems(policy("r2", []), [pool, good])
    assert str(dup).startswith('RoutingPolicy/r2: spec.poolRef: ModelPool "p" already has RoutingPolicy "r"')
    assert admission_problems(policy("r", []), [pool, good], old=good) == []
    # a pool change that drops a pinned adapter is denied; problems already there are not the change's
    shrunk = load_object({**POOL, "spec": {**POOL["spec"], "adapters": []}})
    assert shrunk is not None
    (dropped,) = admission_problems(shrunk, [pool, good], old=pool)
    assert "pin[0]" in str(dropped)
    assert admission_problems(shrunk, [bad], old=shrunk) == []
    # a pool of another namespace is another pool
    elsewhere = load_object({**POOL, "metadata": {"name": "p", "namespace": "other"}})
    assert elsewhere is not None and admission_problems(bad, [elsewhere]) == []
    assert load_object({"kind": "ModelPool"}) is None


def test_self_signed_certificate_serves_the_webhook_host(tmp_path: Any) -> None:
    from corral.operator.admission import self_signed

    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    client = ssl.create_default_context(cadata=cert.decode())  # the caBundle the apiserver gets
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
