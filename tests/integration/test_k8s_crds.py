"""Corral's CRDs against the real apiserver.

* every ``manifests/crds/*.yaml`` applies and becomes Established (structural schema, names accepted);
* every ``manifests/examples/*.yaml`` is accepted (server-side apply, fieldValidation=Strict, as kubectl).

The fixtures of ``tests/data/invalid``, ``tests/data/valid`` and ``tests/data/invalid-cross`` (and the
examples once more) are sent to the apiserver by ``test_k8s_parity.py``, which compares its verdict with
``corral validate``'s and checks each ``# expect-server:`` header.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crds"
EXAMPLES_DIR = REPO / "manifests" / "examples"


def _yaml_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


CRD_FILES = _yaml_files(CRD_DIR)
EXAMPLE_FILES = _yaml_files(EXAMPLES_DIR)


def _ids(files: list[Path]) -> list[str]:
    return [f.name for f in files]


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, (
            f"{path.name}: not a k8s object: {d!r}"
        )
    return docs


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
