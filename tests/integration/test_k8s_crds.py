"""Corral's CRDs against the real apiserver.

* every ``manifests/crds/*.yaml`` applies and becomes Established (structural schema, names accepted);
* every ``manifests/examples/*.yaml`` is accepted (server-side apply, fieldValidation=Strict, as kubectl);
* every ``tests/data/invalid/*.yaml`` is rejected by the apiserver itself. Each such file starts with
  header comments::

      # expect: <what the client-side (pydantic) validation should say>
      # expect-server: <substring of the apiserver's Status.message>   ("-": not checkable server-side)

  The object is POSTed with fieldValidation=Strict (kubectl's default). A rejection is HTTP 422
  (reason Invalid: schema, enum, bounds, required, CEL rules) or, for unknown fields only, HTTP 400
  with "strict decoding error" (how the apiserver reports them under Strict). An apiVersion/kind the
  server does not serve at all is rejected at discovery, as kubectl does ("no matches for kind ...";
  the test checks the server's discovery really lacks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client
from kubernetes.dynamic.exceptions import ResourceNotFoundError

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crds"
EXAMPLES_DIR = REPO / "manifests" / "examples"
INVALID_DIR = REPO / "tests" / "data" / "invalid"


def _yaml_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


CRD_FILES = _yaml_files(CRD_DIR)
EXAMPLE_FILES = _yaml_files(EXAMPLES_DIR)
INVALID_FILES = _yaml_files(INVALID_DIR)


def _ids(files: list[Path]) -> list[str]:
    return [f.name for f in files]


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, (
            f"{path.name}: not a k8s object: {d!r}"
        )
    return docs


def _headers(path: Path) -> dict[str, str]:
    """``# key: value`` comment lines at the top of a file (until the first non-comment line)."""
    headers: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        key, sep, value = stripped.lstrip("#").strip().partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return headers


def _established(cluster: K8sCluster, name: str) -> bool:
    crd = client.ApiextensionsV1Api(cluster.api_client).read_custom_resource_definition(name)
    conds = {c.type: c for c in crd.status.conditions or []}
    nonstructural = conds.get("NonStructuralSchema")
    if nonstructural is not None and nonstructural.status == "True":
        raise AssertionError(f"CRD {name} has a non-structural schema: {nonstructural.message}")
    names = conds.get("NamesAccepted")
    if names is not None and names.status == "False":
        raise AssertionError(f"CRD {name} names not accepted: {names.message}")
    est = conds.get("Established")
    return est is not None and est.status == "True"


def _install_crd_file(cluster: K8sCluster, path: Path) -> list[str]:
    names = []
    for doc in _docs(path):
        assert doc["kind"] == "CustomResourceDefinition", f"{path.name}: {doc['kind']} in manifests/crds"
        res = cluster.apply(doc)
        assert res.status in (200, 201), f"{path.name}: CRD apply -> HTTP {res.status}: {res.message}"
        names.append(doc["metadata"]["name"])
    for name in names:
        cluster.wait_until(
            lambda n=name: _established(cluster, n), timeout=30, what=f"CRD {name} Established"
        )
    return names


@pytest.fixture(scope="module")
def corral_crds(k8s_cluster: K8sCluster) -> list[str]:
    """All CRDs from manifests/crds applied and Established; their names."""
    if not CRD_FILES:
        pytest.fail(
            f"no CRDs in {CRD_DIR.relative_to(REPO)} (generate them with `corral crds`)", pytrace=False
        )
    names = [n for f in CRD_FILES for n in _install_crd_file(k8s_cluster, f)]
    # make the dynamic client see the new kinds
    k8s_cluster.dynamic.resources.invalidate_cache()
    return names


def test_crd_manifests_present() -> None:
    assert CRD_FILES, f"no CRD manifests in {CRD_DIR.relative_to(REPO)}"


@pytest.mark.parametrize("path", CRD_FILES, ids=_ids(CRD_FILES))
def test_crd_established(k8s_cluster: K8sCluster, path: Path) -> None:
    names = _install_crd_file(k8s_cluster, path)
    assert names
    # second apply is a no-op update (idempotent install), still Established
    for doc in _docs(path):
        res = k8s_cluster.apply(doc)
        assert res.status == 200, f"{path.name}: re-apply -> HTTP {res.status}: {res.message}"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=_ids(EXAMPLE_FILES))
def test_example_accepted(
    k8s_cluster: K8sCluster, corral_crds: list[str], k8s_namespace: str, path: Path
) -> None:
    for doc in _docs(path):
        res = k8s_cluster.apply(doc, k8s_namespace)
        name = doc.get("metadata", {}).get("name")
        assert res.status in (200, 201), f"{path.name} {doc['kind']}/{name}: HTTP {res.status}: {res.message}"
        assert res.body.get("kind") == doc["kind"]


@pytest.mark.parametrize("path", INVALID_FILES, ids=_ids(INVALID_FILES))
def test_invalid_rejected_by_apiserver(
    k8s_cluster: K8sCluster, corral_crds: list[str], k8s_namespace: str, path: Path
) -> None:
    headers = _headers(path)
    expect = headers.get("expect-server")
    assert expect is not None, f"{path.name}: missing '# expect-server: <substring>' header (or '-')"
    if expect == "-":
        pytest.skip(f"{path.name}: marked not checkable server-side (expect-server: -)")
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: expected exactly one object, found {len(docs)}"
    obj = docs[0]
    try:
        k8s_cluster.resource(obj["apiVersion"], obj["kind"])
    except ResourceNotFoundError:
        # Not a 422 case: the apiserver does not serve this kind/version at all. kubectl (and the
        # dynamic client) fail at discovery, before any POST; check the server really lacks the
        # group/version and compare against kubectl's wording of that discovery miss.
        gv = obj["apiVersion"]
        served = k8s_cluster.request("GET", f"/apis/{gv}" if "/" in gv else f"/api/{gv}")
        if served.status == 200:
            kinds = {r.get("kind") for r in served.body.get("resources", [])}
            assert obj["kind"] not in kinds, f"{path.name}: discovery missed a served kind?"
        else:
            assert served.status == 404, (
                f"{path.name}: GET /apis/{gv} -> HTTP {served.status}: {served.message}"
            )
        message = f'no matches for kind "{obj["kind"]}" in version "{gv}"'
        assert expect in message, f"{path.name}: rejected at discovery ({message}); expected {expect!r}"
        return
    res = k8s_cluster.create(obj, k8s_namespace)
    assert res.status >= 400, (
        f"{path.name}: the apiserver ACCEPTED it (HTTP {res.status}); expected a 422 containing {expect!r}"
    )
    strict_decoding = res.status == 400 and "strict decoding error" in res.message
    assert res.status == 422 or strict_decoding, (
        f"{path.name}: expected rejection (422 Invalid), got HTTP {res.status}: {res.message or res.body}"
    )
    assert expect in res.message, (
        f"{path.name}: apiserver rejected it (HTTP {res.status}) but its message lacks {expect!r}:\n"
        f"{res.message}"
    )
