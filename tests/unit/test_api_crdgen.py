"""CRD generator: committed files are up to date, and the schemas are structural."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.api import crdgen
from corral.api.models import KINDS, ModelPool, RoutingPolicy
from pydantic import BaseModel

CRD_DIR = Path(__file__).resolve().parents[2] / "manifests" / "crds"


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node (properties, items, additionalProperties), with its path."""
    if not isinstance(node, dict):
        return
    yield path, node
    for k, v in node.get("properties", {}).items():
        yield from walk(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


@pytest.fixture(scope="module", params=sorted(crdgen.render_all()))
def crd(request: pytest.FixtureRequest) -> dict[str, Any]:
    return yaml.safe_load(crdgen.render_all()[request.param])


def test_committed_crds_are_up_to_date(tmp_path: Path) -> None:
    written = crdgen.write(tmp_path)
    assert len(written) == len(KINDS)
    for f in written:
        committed = CRD_DIR / f.name
        assert committed.exists(), f"{committed} missing: run `corral crds --out manifests/crds`"
        stale = f"{committed} is stale: run `corral crds --out manifests/crds`"
        assert committed.read_text() == f.read_text(), stale
    assert crdgen.check(CRD_DIR) == []


def test_output_is_deterministic() -> None:
    assert crdgen.render_all() == crdgen.render_all()


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for word in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title:", "uniqueItems", "type: 'null'"):
        assert word not in text
    for path, node in walk(schema):
        has_type = "type" in node or node.get("x-kubernetes-preserve-unknown-fields")
        assert has_type, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both"
        assert "default" not in node or node["default"] is not None, f"{path}: default null"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list (CEL cost)"
        if path.startswith((".spec", ".status")) and path.count(".") >= 2 and not path.endswith(("[]", ".*")):
            assert node.get("description"), f"{path}: no description"
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["required"] == ["spec"]


def test_crd_metadata(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    model = KINDS[spec["names"]["kind"]]
    assert crd["metadata"]["name"] == f"{model.crd.plural}.corral.dev"
    assert spec["group"] == "corral.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["categories"] == ["corral"]
    version = spec["versions"][0]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert "Ready" in columns and columns[-1] == "Age"


def test_modelpool_details() -> None:
    crd = crdgen.crd(ModelPool)
    assert crd["spec"]["names"]["shortNames"] == ["mp"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    gc = spec["properties"]["gpuClasses"]
    assert gc["x-kubernetes-list-type"] == "map" and gc["x-kubernetes-list-map-keys"] == ["name"]
    rules = gc["items"]["x-kubernetes-validations"]
    assert [r["fieldPath"] for r in rules] == [".maxReplicas", ".replicas"]
    assert all("messageExpression" in r and "string(" not in r["messageExpression"] for r in rules)
    replicas = gc["items"]["properties"]["replicas"]
    assert replicas["nullable"] is True and "default" not in replicas
    assert gc["items"]["properties"]["profile"]["enum"] == ["H100", "A100-80GB", "L4"]
    assert spec["properties"]["adapterCache"]["default"] == {}
    args = spec["properties"]["models"]["items"]["properties"]["engineArgs"]
    # untyped values that may hold no item: strings, numbers and booleans (as pydantic checks them)
    assert args["additionalProperties"] == {
        "x-kubernetes-preserve-unknown-fields": True, "maxProperties": 0, "maxItems": 0
    }  # fmt: skip
    assert [r["fieldPath"] for r in spec["x-kubernetes-validations"]] == [".adapters", ".adapters"]
    selector = gc["items"]["properties"]["nodeSelector"]
    assert selector["x-kubernetes-validations"][0]["rule"].startswith("self.all(k, !format.qualifiedName()")
    assert selector["additionalProperties"]["maxLength"] == 63 and selector["additionalProperties"]["pattern"]
    ref = spec["properties"]["routingPolicyRef"]
    assert (ref["minLength"], ref["maxLength"]) == (1, 63)
    assert spec["properties"]["adapters"]["items"]["properties"]["source"]["maxLength"] == 1024


def test_routingpolicy_details() -> None:
    crd = crdgen.crd(RoutingPolicy)
    assert crd["spec"]["names"]["shortNames"] == ["rp"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    slo = spec["properties"]["ttftSloMs"]
    assert (slo["minimum"], slo["exclusiveMinimum"]) == (0, True)
    assert spec["properties"]["blockSize"]["enum"] == [8, 16, 32, 64, 128]
    assert spec["properties"]["strategy"]["default"] == "corral"
    rule = spec["properties"]["modelSelection"]["properties"]["rules"]["items"]
    when = rule["properties"]["when"]
    assert when["x-kubernetes-validations"][0]["rule"].endswith("== 1")  # exactly one operator, each level
    leaf = when["properties"]["all"]["items"]["properties"]["all"]["items"]
    assert set(leaf["properties"]) == {"signal", "not"}  # the deepest levels: a signal or its negation
    assert spec["properties"]["adapterPaging"]["properties"]["pin"]["x-kubernetes-list-type"] == "set"
    hot = spec["properties"]["load"]["properties"]["hotspotFactor"]
    assert (hot["minimum"], hot["exclusiveMinimum"]) == (1, True)  # the corral policy needs c > 1
    assert spec["properties"]["load"]["properties"]["twoChoiceAbove"]["minimum"] == 1
    selection = spec["properties"]["modelSelection"]["x-kubernetes-validations"]
    assert selection[0]["rule"].startswith("!has(self.rules) || self.rules.all(r, ")


def test_structural_rejects_unions() -> None:
    class Bad(BaseModel):
        x: int | str

    with pytest.raises(crdgen.NotStructuralError, match="anyOf"):
        crdgen.structural(Bad.model_json_schema())
