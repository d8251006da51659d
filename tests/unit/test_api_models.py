"""CRD models and GPU profiles: defaults, cross-field rules and their messages, round trips."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.api import crdgen, modelpool, routingpolicy, selection
from corral.api.models import STRATEGIES, AdapterCache, GpuClass, ModelPool, RoutingPolicy, RoutingPolicySpec
from corral.api.profiles import (
    BUILTIN_PROFILES,
    GpuProfile,
    UnknownProfileError,
    adapter_bytes,
    adapter_mb,
    resolve_profile,
)
from corral.api.validation import error_lines, go_yaml_scalar, validate_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def pool(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "models": [{"name": "m", "baseModel": "org/m"}],
        "gpuClasses": [{"name": "g", "maxReplicas": 2}],
    }
    base.update(spec)
    return {"apiVersion": "corral.dev/v1alpha1", "kind": "ModelPool", "metadata": {"name": "p"}, "spec": base}


def errors(cls: type[ModelPool] | type[RoutingPolicy], doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        cls.model_validate(doc)
    return [f"{p}: {m}" for p, m in error_lines(exc.value)]


# ----------------------------------------------------------------------------------------- profiles


def test_builtin_profiles_numbers() -> None:
    h100, a100, l4 = (BUILTIN_PROFILES[n] for n in ("H100", "A100-80GB", "L4"))
    assert (h100.b0_us, h100.b1_us, h100.b2_us) == (5753.0, 17.3, 6.0)
    assert (a100.b0_us, a100.b1_us, a100.b2_us) == (16442.0, 47.8, 18.2)
    assert l4.b1_us == pytest.approx(17.3 * 989 / 121, rel=1e-3)
    assert l4.b0_us == pytest.approx(5753 * 3.35 / 0.3, rel=1e-3)
    assert l4.b2_us == pytest.approx(6.0 * 3.35 / 0.3, rel=1e-3)
    assert 400_000 <= h100.kv_capacity_tokens <= 450_000 and 40_000 <= l4.kv_capacity_tokens <= 50_000
    assert h100.max_num_batched_tokens == 8192 and h100.max_num_seqs == 256


def test_profile_helpers() -> None:
    h = BUILTIN_PROFILES["H100"]
    assert h.step_us(100, 10) == pytest.approx(5753 + 1730 + 60)
    assert h.prefill_s(0) == 0.0
    assert h.prefill_s(1000) == pytest.approx((5753 + 17300) / 1e6)
    assert h.prefill_s(8193) == pytest.approx((2 * 5753 + 17.3 * 8193) / 1e6)  # two chunks
    assert h.decode_step_s(32) == pytest.approx((5753 + 6 * 32) / 1e6)
    mb = adapter_mb(16)
    assert 80 <= mb <= 90 and adapter_bytes(16) == 83_886_080
    assert h.adapter_load_s(mb, "gpu") == 0.0
    assert 0.002 < h.adapter_load_s(mb, "cpu") < 0.01
    assert 0.05 < h.adapter_load_s(mb, "disk") < 0.2
    with pytest.raises(ValueError):
        h.adapter_load_s(mb, "tape")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        adapter_bytes(8, targets=("qkv",))


def test_resolve_profile() -> None:
    assert resolve_profile("h100") is BUILTIN_PROFILES["H100"]
    assert resolve_profile("NVIDIA-A100-SXM4-80GB").name == "A100-80GB"
    custom = resolve_profile("L4", {"kv_capacity_tokens": 20_000, "b0_us": None})
    assert custom.kv_capacity_tokens == 20_000 and custom.b0_us == BUILTIN_PROFILES["L4"].b0_us
    assert resolve_profile(custom) is custom
    with pytest.raises(UnknownProfileError, match="built-in: H100, A100-80GB, L4"):
        resolve_profile("TPUv5")
    with pytest.raises(ValidationError):
        resolve_profile("H100", {"b0_us": -1})
    with pytest.raises(ValidationError):
        BUILTIN_PROFILES["H100"].b0_us = 1  # type: ignore[misc]
    assert isinstance(hash(BUILTIN_PROFILES["H100"]), int)
    assert GpuProfile.model_fields.keys() >= {"lora_cpu_to_gpu_ms_per_mb", "peak_bf16_tflops"}


# ------------------------------------------------------------------------------------------- models


def test_examples_parse_and_round_trip() -> None:
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            cls = ModelPool if doc["kind"] == "ModelPool" else RoutingPolicy
            obj = cls.model_validate(doc)
            assert cls.model_validate(obj.to_k8s()) == obj


def test_example_pool_content() -> None:
    mp = ModelPool.model_validate(yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text()))
    assert len(mp.spec.adapters) >= 8
    assert {g.name for g in mp.spec.gpu_classes} == {"h100", "a100"}
    assert mp.spec.gpu_classes[1].gpu_profile().name == "A100-80GB"
    assert all(a.source.startswith("file:///var/lib/corral/adapters/") for a in mp.spec.adapters)


def test_defaults_and_helpers() -> None:
    mp = ModelPool.model_validate(pool())
    g = mp.spec.gpu_classes[0]
    assert (g.min_replicas, g.desired_replicas, g.gpus_per_replica, g.profile) == (1, 1, 1, "H100")
    assert mp.spec.models[0].engine == "sim"
    assert mp.spec.adapter_cache.effective_cpu_slots == mp.spec.adapter_cache.gpu_slots
    assert AdapterCache(gpu_slots=2, cpu_slots=8).effective_cpu_slots == 8
    assert mp.status is None and mp.spec.adapters == []
    rp = RoutingPolicy.model_validate(
        {"apiVersion": "corral.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "r"},
         "spec": {"poolRef": "p"}}
    )  # fmt: skip
    s = rp.spec
    assert (s.strategy, s.block_size, s.load.hotspot_factor, s.adapter_paging.prefetch_to_cpu) == (
        "corral", 16, 3.0, True
    )  # fmt: skip
    assert "dualmap" in STRATEGIES and "dualmap_paper" in STRATEGIES and len(STRATEGIES) == 11


def test_populate_by_name_and_overrides() -> None:
    g = GpuClass(
        name="l4", max_replicas=3, replicas=2, profile="L4", profile_overrides={"kv_capacity_tokens": 1000}
    )
    assert g.gpu_profile().kv_capacity_tokens == 1000 and g.gpu_profile().name == "L4"
    assert g.to_k8s()["profileOverrides"] == {"kvCapacityTokens": 1000}


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (
            [{"name": "a", "maxReplicas": 1}, {"name": "b", "minReplicas": 2, "maxReplicas": 1}],
            ["spec.gpuClasses[1].maxReplicas: must be >= minReplicas (got 1 < 2)"],
        ),
        (
            [{"name": "a", "minReplicas": 1, "maxReplicas": 2, "replicas": 0}],
            ["spec.gpuClasses[0].replicas: must be within [minReplicas, maxReplicas] (got 0 not in [1, 2])"],
        ),
        (
            [{"name": "a", "maxReplicas": 1}, {"name": "a", "maxReplicas": 1}],
            ['spec.gpuClasses[1]: Duplicate value: {"name":"a"}'],
        ),
    ],
)
def test_gpu_class_rules(classes: list[dict[str, Any]], expected: list[str]) -> None:
    assert errors(ModelPool, pool(gpuClasses=classes)) == expected


def test_adapter_rules() -> None:
    ad = [
        {"name": "x", "baseModel": "m", "source": "file:///a"},
        {"name": "x", "baseModel": "m", "source": "hf://o/r"},
    ]
    assert errors(ModelPool, pool(adapters=ad)) == ['spec.adapters[1]: Duplicate value: {"name":"x"}']
    ad = [{"name": "x", "baseModel": "nope", "source": "file:///a"}]
    assert errors(ModelPool, pool(adapters=ad)) == [
        'spec.adapters[0].baseModel: must name a model in spec.models (got "nope")'
    ]
    cache = {"gpuSlots": 8, "cpuSlots": 4}
    assert errors(ModelPool, pool(adapterCache=cache)) == [
        "spec.adapterCache.cpuSlots: must be >= gpuSlots (got 4 < 8)"
    ]


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("file:///var/lib/corral/adapters/sql", True),
        ("file://adapters/sql", True),
        ("s3://my-bucket/loras/sql/v1", True),
        ("hf://acme/sql-lora", True),
        ("hf://acme/sql-lora@3f2a9c1", True),
        ("hf://acme/sql-lora@refs/pr/1", True),
        ("file://", False),
        ("s3://Bad_Bucket/key", False),
        ("s3://bucket", False),
        ("hf://acme", False),
        ("hf://acme/repo@", False),
        ("https://huggingface.co/acme/sql", False),
        ("/var/lib/corral/adapters/sql", False),
        ("file:///has space", False),
    ],
)
def test_source_uri(uri: str, ok: bool) -> None:
    doc = pool(adapters=[{"name": "a", "baseModel": "m", "source": uri}])
    if ok:
        ModelPool.model_validate(doc)
    else:
        assert errors(ModelPool, doc) == [
            f'spec.adapters[0].source: {modelpool.RULE_SOURCE_URI.message} (got "{uri}")'
        ]


def test_engine_args_must_be_scalars() -> None:
    """The CRD's rule (untyped values that may hold no item) and pydantic's are the same rule."""
    args = {"ok": 1, "nested": {"a": 1}, "lst": [1, 2], "inf": float("inf")}
    assert errors(ModelPool, pool(models=[{"name": "m", "baseModel": "o/m", "engineArgs": args}])) == [
        "spec.models[0].engineArgs.nested: must be a string, number or boolean "
        "(a non-empty object: Too many: 1: must have at most 0 items)",
        "spec.models[0].engineArgs.lst: must be a string, number or boolean "
        "(a non-empty list: Too many: 2: must have at most 0 items)",
        "spec.models[0].engineArgs.inf: must be a finite number",
    ]
    args = {"b": True, "i": 3, "f": 0.9, "s": "bfloat16", "empty": {}, "none": None}
    mp = ModelPool.model_validate(pool(models=[{"name": "m", "baseModel": "o/m", "engineArgs": args}]))
    assert mp.spec.models[0].engine_args == {"b": True, "i": 3, "f": 0.9, "s": "bfloat16", "empty": {}}
    assert type(mp.spec.models[0].engine_args["b"]) is bool
    schema = crdgen.crd(ModelPool)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    items = schema["properties"]["spec"]["properties"]["models"]["items"]["properties"]["engineArgs"]
    assert items["additionalProperties"] == {
        "x-kubernetes-preserve-unknown-fields": True, "maxProperties": 0, "maxItems": 0
    }  # fmt: skip


def test_rule_messages_match_cel_messages() -> None:
    """The Python message starts with the CEL rule's static message (same words on both paths)."""
    for rule in (
        modelpool.RULE_MAX_GE_MIN,
        modelpool.RULE_REPLICAS_IN_RANGE,
        modelpool.RULE_CPU_GE_GPU_SLOTS,
    ):
        assert rule.message_expression and rule.message_expression.startswith(f"'{rule.message} (got ")
    assert modelpool.SOURCE_PATTERN in modelpool.RULE_SOURCE_URI.rule
    assert modelpool.BASE_MODEL_UNKNOWN in modelpool.RULE_ADAPTER_BASE_MODEL.message


def test_unknown_fields_and_status() -> None:
    doc = pool()
    doc["spec"]["gpuClasses"][0]["nodeselector"] = {}
    doc["extra"] = 1
    assert sorted(errors(ModelPool, doc)) == [
        "extra: unknown field",
        "spec.gpuClasses[0].nodeselector: unknown field",
    ]
    doc = pool()
    doc["metadata"].update(uid="123", resourceVersion="9", generation=2)  # permissive metadata
    doc["status"] = {
        "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "gpuClasses": [{"name": "g", "desiredReplicas": 2, "readyReplicas": 1}],
        "adapterResidency": [{"name": "a", "gpuReplicas": ["g-0"], "cpuReplicas": ["g-1"]}],
    }  # fmt: skip
    mp = ModelPool.model_validate(doc)
    assert mp.status is not None and mp.status.conditions[0].status == "True"
    assert ModelPool.model_validate(mp.to_k8s()) == mp
    bad = {"conditions": [{"type": "Healthy", "status": "True"}]}
    assert errors(ModelPool, {**pool(), "status": bad})[0].startswith(
        "status.conditions[0].type: Unsupported"
    )


def test_routing_policy_rules() -> None:
    assert errors(RoutingPolicy, rp(ttftSloMs=-5)) == ["spec.ttftSloMs: should be greater than 0 (got -5)"]
    assert errors(RoutingPolicy, rp(blockSize=16.5))[0].startswith("spec.blockSize: Unsupported value: 16.5")
    ok = RoutingPolicy.model_validate(
        rp(tenants={"secretRef": {"name": "keys"}}, adapterPaging={"pin": ["sql"]},
           modelSelection={"rules": []})
    )  # fmt: skip
    assert ok.spec.tenants is not None and ok.spec.tenants.secret_ref.key == "api-keys"
    assert errors(RoutingPolicy, rp(poolRef="Not_A_Name"))[0].startswith("spec.poolRef: should match")


def rp(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "corral.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "r"},
            "spec": {"poolRef": "p", **spec}}  # fmt: skip


def offline(text: str) -> list[str]:
    """``corral validate`` on a YAML text: its problem lines without the file name."""
    return [str(p).removeprefix("<t>: ") for p in validate_text(text, "<t>").problems]


# --------------------------------------------------------------------- as strict as the apiserver (issue 9)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (pool(gpuClasses=[{"name": "g", "maxReplicas": "2"}]),
         'spec.gpuClasses[0].maxReplicas: must be of type integer (got "2")'),
        (pool(gpuClasses=[{"name": "g", "maxReplicas": True}]),
         "spec.gpuClasses[0].maxReplicas: must be of type integer (got true)"),
        (pool(gpuClasses=[{"name": "g", "maxReplicas": 2.5}]),
         "spec.gpuClasses[0].maxReplicas: must be of type integer (got 2.5)"),
        (rp(adapterPaging={"prefetchToCpu": "false"}),
         'spec.adapterPaging.prefetchToCpu: must be of type boolean (got "false")'),
        (rp(adapterPaging={"prefetchToCpu": 0}),
         "spec.adapterPaging.prefetchToCpu: must be of type boolean (got 0)"),
        (rp(ttftSloMs="500"), 'spec.ttftSloMs: must be of type number (got "500")'),
        (rp(ttftSloMs=True), "spec.ttftSloMs: must be of type number (got true)"),
        (rp(ttftSloMs=math.inf), "spec.ttftSloMs: must be a finite number (got Infinity)"),
        (rp(load={"hotspotFactor": math.nan}), "spec.load.hotspotFactor: must be a finite number (got NaN)"),
        (rp(poolRef=5), "spec.poolRef: must be of type string (got 5)"),
        (pool(adapterCache=[]), "spec.adapterCache: must be of type object"),
    ],
)  # fmt: skip
def test_no_type_coercion(doc: dict[str, Any], expected: str) -> None:
    """The apiserver never coerces ("2" -> 2, "false" -> False, true -> 1): neither does corral validate."""
    cls = ModelPool if doc["kind"] == "ModelPool" else RoutingPolicy
    assert errors(cls, doc) == [expected]


def test_numbers_the_apiserver_accepts() -> None:
    """An int where a number goes; a whole float where an int goes (kubectl sends YAML's 4.0 as 4)."""
    r = RoutingPolicy.model_validate(rp(ttftSloMs=500, load={"hotspotFactor": 2}))
    assert r.spec.ttft_slo_ms == 500.0 and isinstance(r.spec.ttft_slo_ms, float)
    text = yaml.safe_dump(pool(gpuClasses=[{"name": "g", "maxReplicas": 4}])).replace(
        "maxReplicas: 4", "maxReplicas: 4.0"
    )
    report = validate_text(text, "<t>")
    assert report.ok, report.problems
    mp = report.objects[0]
    assert isinstance(mp, ModelPool) and mp.spec.gpu_classes[0].max_replicas == 4


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"name": "Llama_8B"}, "metadata.name: a lowercase RFC 1123 subdomain must consist of"),
        ({"name": "a..b"}, "metadata.name: a lowercase RFC 1123 subdomain must consist of"),
        ({"name": "a" * 254}, "metadata.name: must be no more than 253 characters"),
        ({"name": "p", "namespace": "Prod"}, "metadata.namespace: a lowercase RFC 1123 label must"),
        ({"name": "p", "labels": {"team name": "ml"}}, "metadata.labels: name part must consist of"),
        ({"name": "p", "labels": {"/x": "ml"}}, "metadata.labels: prefix part must be non-empty"),
        ({"name": "p", "labels": {"Corral.dev/x": "ml"}}, "metadata.labels: prefix part a lowercase"),
        ({"name": "p", "labels": {"team": "a" * 64}}, "metadata.labels: must be no more than 63 characters"),
        ({"name": "p", "labels": {"team": "-ml"}}, "metadata.labels: a valid label must be an empty string"),
        ({"name": "p", "annotations": {"a/b/c": "x"}}, "metadata.annotations: a valid label key must"),
        ({"name": "p", "annotations": {"a": "x" * 300_000}}, "metadata.annotations: Too long: must have"),
        ({"name": "p", "lables": {}}, "metadata.lables: unknown field"),
    ],
)  # fmt: skip
def test_metadata_syntax(meta: dict[str, Any], expected: str) -> None:
    doc = pool()
    doc["metadata"] = meta
    got = errors(ModelPool, doc)
    assert len(got) == 1 and got[0].startswith(expected), got


def test_metadata_accepted() -> None:
    doc = pool()
    doc["metadata"] = {
        "name": "llama.8b-v1", "namespace": "ml-prod",
        "labels": {"app.kubernetes.io/part-of": "corral", "x": ""},
        "annotations": {"Example.com/Any": "free text: {}"},
        "uid": "u", "resourceVersion": "1", "generation": 3,
        "creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": [{"manager": "kubectl"}],
    }  # fmt: skip
    assert ModelPool.model_validate(doc).metadata.generation == 3


def test_node_selector_label_syntax() -> None:
    bad_key = pool(gpuClasses=[{"name": "g", "maxReplicas": 1, "nodeSelector": {"gpu product": "h100"}}])
    assert errors(ModelPool, bad_key) == [
        f'spec.gpuClasses[0].nodeSelector: {modelpool.RULE_NODE_SELECTOR_KEYS.message} (got ["gpu product"])'
    ]
    bad_value = pool(gpuClasses=[{"name": "g", "maxReplicas": 1, "nodeSelector": {"gpu": "H 100"}}])
    assert errors(ModelPool, bad_value)[0].startswith(
        f"spec.gpuClasses[0].nodeSelector.gpu: should match '{modelpool.LABEL_VALUE_PATTERN}'"
    )
    ok = {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
    }
    ModelPool.model_validate(pool(gpuClasses=[{"name": "g", "maxReplicas": 1, "nodeSelector": ok}]))


def test_model_and_adapter_names_differ() -> None:
    ad = [{"name": "m", "baseModel": "m", "source": "file:///a"}]
    assert errors(ModelPool, pool(adapters=ad)) == [f'spec.adapters: {modelpool.NAME_CLASH} (got ["m"])']
    rule = modelpool.RULE_ADAPTER_MODEL_NAME_CLASH
    assert rule.message == modelpool.NAME_CLASH and rule.message_expression
    assert rule.message_expression.startswith(f"'{rule.message} (got ")


def test_routing_policy_ref_not_empty() -> None:
    assert errors(ModelPool, pool(routingPolicyRef="")) == [
        'spec.routingPolicyRef: should have at least 1 character (got "")'
    ]
    assert ModelPool.model_validate(pool(routingPolicyRef="r")).spec.routing_policy_ref == "r"


def test_pins_are_a_set() -> None:
    assert errors(RoutingPolicy, rp(adapterPaging={"pin": ["a", "b", "a"]})) == [
        'spec.adapterPaging.pin[2]: Duplicate value: "a"'
    ]


def test_model_selection_rules_are_checked_field_by_field() -> None:
    sel = {
        "signals": [{"name": "code", "keywords": ["def"]}],
        "rules": [{"name": "a", "when": {"any": [{"signal": "code"}, {"not": {"signal": "nope"}}]},
                   "target": "sql"}],
        "default": "llama",
    }  # fmt: skip
    assert errors(RoutingPolicy, rp(modelSelection=sel)) == [
        f'spec.modelSelection.rules[0].when.any[1].not.signal: {selection.KNOWN_SIGNALS_MESSAGE} (got "nope")'
    ]
    ok = {**sel, "rules": [{"name": "a", "when": {"signal": "code"}, "target": "sql"}]}
    assert RoutingPolicy.model_validate(rp(modelSelection=ok)).spec.model_selection.rules[0].target == "sql"
    assert errors(RoutingPolicy, rp(modelSelection={**ok, "default": None})) == [
        f"spec.modelSelection.default: {selection.RULE_DEFAULT_WITH_RULES.message}"
    ]
    cel_rules = crdgen.structural(
        RoutingPolicy.model_json_schema(by_alias=True)["$defs"]["ModelSelection"],
        RoutingPolicy.model_json_schema(by_alias=True)["$defs"],
    )["x-kubernetes-validations"]
    assert cel_rules == [
        *(r.to_schema() for r in selection.RULES_KNOWN_SIGNALS),
        selection.RULE_DEFAULT_WITH_RULES.to_schema(),
    ]


def _bounds(field: Any) -> dict[str, float]:
    out = {}
    for m in field.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


def test_policy_knob_ranges_equal_the_runtime() -> None:
    """What the CRD accepts, the corral policy honours: no knob passes validation and is then dropped."""
    from corral.router.policies.corral import CorralParams

    load = routingpolicy.LoadSpec.model_fields
    runtime = CorralParams.model_fields
    assert _bounds(load["hotspot_factor"])["gt"] == _bounds(runtime["hotspot_c"])["gt"] == 1.0
    assert _bounds(load["two_choice_above"])["ge"] == _bounds(runtime["narrow_above"])["ge"] == 1
    slo = _bounds(routingpolicy.RoutingPolicySpec.model_fields["ttft_slo_ms"])
    assert slo["gt"] == _bounds(runtime["ttft_slo_s"])["gt"] == 0
    assert errors(RoutingPolicy, rp(load={"hotspotFactor": 1.0})) == [
        "spec.load.hotspotFactor: should be greater than 1 (got 1.0)"
    ]
    assert errors(RoutingPolicy, rp(load={"twoChoiceAbove": 0})) == [
        "spec.load.twoChoiceAbove: should be greater than or equal to 1 (got 0)"
    ]
    CorralParams.model_validate({"hotspot_c": 1.01, "narrow_above": 1, "ttft_slo_s": 1e-6})  # edges run


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    deep = "{" + "a: {" * 2000 + "b: 1" + "}" * 2001
    text = yaml.safe_dump(pool()).replace(
        "baseModel: org/m", "baseModel: org/m\n    engineArgs: {x: " + deep + "}"
    )
    assert offline(text) == [
        "<t>:11: ModelPool/p: spec.models[0].engineArgs.x.a.a.a...: "
        "nested deeper than 64 levels (no Corral field is)"
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", True), ("y", True), ("Y", True), ("on", True), ("n", False), ("off", False), ("~", None),
        ("Null", None), ("", None), ("0x10", 16), ("0o10", 8), ("010", 8), ("08", 8), ("0b101", 5),
        ("1_000", 1000), ("+1", 1), ("1e3", 1000), ("1.5e3", 1500), ("+.5", 0.5), (".5", 0.5), ("4.0", 4),
        ("1:20", "1:20"), ("2024-01-01", "2024-01-01"), ("1e400", "1e400"), ("abc", "abc"),
    ],
)  # fmt: skip
def test_plain_scalars_resolve_as_in_kubectl(text: str, value: Any) -> None:
    """Checked one by one against kube-apiserver 1.37 (YAML request bodies); PyYAML alone differs on y, 0o10,
    1e3, 1.5e3, +.5, 1:20 and timestamps."""
    got = go_yaml_scalar(text)
    assert got == value and type(got) is type(value)


def test_null_means_unset() -> None:
    """The apiserver prunes a null field and applies its default: so does corral validate."""
    text = yaml.safe_dump(rp()) + "  ttftSloMs: ~\n  load: {twoChoiceAbove: null}\n"
    report = validate_text(text, "<t>")
    assert report.ok, report.problems
    spec = report.objects[0].spec
    assert isinstance(spec, RoutingPolicySpec)
    assert (spec.ttft_slo_ms, spec.load.two_choice_above) == (2000.0, 16)


def test_yaml_read_as_kubectl_reads_it() -> None:
    text = yaml.safe_dump(pool()).replace("maxReplicas: 2", "maxReplicas: 2\n    maxReplicas: 3")
    assert offline(text) == ['<t>:8: YAML syntax error: key "maxReplicas" already set in map']
    stamp = yaml.safe_dump(pool()).replace(
        "baseModel: org/m", "baseModel: org/m\n    engineArgs: {rev: 2024-01-01}"
    )
    report = validate_text(stamp, "<t>")
    assert report.ok and report.objects[0].spec.models[0].engine_args == {"rev": "2024-01-01"}  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- property tests

NAME = st.from_regex(re.compile(r"[a-z][a-z0-9-]{0,10}[a-z0-9]"), fullmatch=True)
SOURCE = st.one_of(
    st.from_regex(re.compile(r"file:///[a-z0-9/_.-]{1,30}"), fullmatch=True),
    st.from_regex(re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,10}[a-z0-9]/[A-Za-z0-9/_.-]{1,20}"), fullmatch=True),
    st.from_regex(re.compile(r"hf://[A-Za-z0-9][A-Za-z0-9_.-]{0,8}/[A-Za-z0-9][A-Za-z0-9_.-]{0,8}(@[a-z0-9]{1,8})?"),
                  fullmatch=True),
)  # fmt: skip
SCALAR = st.one_of(st.booleans(), st.integers(-(2**31), 2**31), st.text(max_size=8),
                   st.floats(allow_nan=False, allow_infinity=False))  # fmt: skip


@st.composite
def valid_pools(draw: st.DrawFn) -> dict[str, Any]:
    model_names = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    models = [
        {"name": n, "baseModel": f"org/{n}", "engine": draw(st.sampled_from(["sim", "vllm"])),
         "engineArgs": draw(st.dictionaries(NAME, SCALAR, max_size=3))}
        for n in model_names
    ]  # fmt: skip
    classes = []
    for n in draw(st.lists(NAME, min_size=1, max_size=3, unique=True)):
        lo = draw(st.integers(0, 5))
        hi = draw(st.integers(max(lo, 1), 10))
        c: dict[str, Any] = {"name": n, "minReplicas": lo, "maxReplicas": hi,
                             "profile": draw(st.sampled_from(sorted(BUILTIN_PROFILES)))}  # fmt: skip
        if draw(st.booleans()):
            c["replicas"] = draw(st.integers(lo, hi))
        classes.append(c)
    adapters = [
        {"name": n, "baseModel": draw(st.sampled_from(model_names)), "rank": draw(st.integers(1, 512)),
         "source": draw(SOURCE)}
        for n in draw(st.lists(NAME.filter(lambda n: n not in model_names), max_size=5, unique=True))
    ]  # fmt: skip
    gpu = draw(st.integers(1, 16))
    cache = {"gpuSlots": gpu, "cpuSlots": draw(st.integers(gpu, 64))}
    return pool(models=models, gpuClasses=classes, adapters=adapters, adapterCache=cache)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_pools())
def test_round_trip_property(doc: dict[str, Any]) -> None:
    mp = ModelPool.model_validate(doc)
    dumped = mp.to_k8s()
    again = ModelPool.model_validate(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again == mp
    for c in mp.spec.gpu_classes:
        assert c.min_replicas <= c.desired_replicas <= c.max_replicas
        assert math.isfinite(c.gpu_profile().prefill_s(1000))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_source_validator_never_crashes(uri: str) -> None:
    doc = pool(adapters=[{"name": "a", "baseModel": "m", "source": uri}])
    try:
        ModelPool.model_validate(doc)
    except ValidationError as exc:
        assert all(p.startswith("spec.adapters[0].source") for p, _ in error_lines(exc))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_value_anywhere_is_a_problem_never_a_crash(data: st.DataObject) -> None:
    """Any JSON value at any place of an example: `corral validate` answers with problems, never raises."""
    example = data.draw(st.sampled_from(sorted(EXAMPLES.glob("*.yaml"))))
    doc = yaml.safe_load(example.read_text())
    where = data.draw(st.sampled_from(_paths(doc)[1:]))
    target = doc
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = data.draw(JSON)
    report = validate_text(yaml.safe_dump(doc), "<t>")
    assert all(str(p) for p in report.problems)
