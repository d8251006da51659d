"""CRD models and GPU profiles: defaults, cross-field rules and their messages, round trips."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from corral.api import modelpool
from corral.api.models import STRATEGIES, AdapterCache, GpuClass, ModelPool, RoutingPolicy
from corral.api.profiles import (
    BUILTIN_PROFILES,
    GpuProfile,
    UnknownProfileError,
    adapter_bytes,
    adapter_mb,
    resolve_profile,
)
from corral.api.validation import error_lines
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
    assert "dualmap" in STRATEGIES and len(STRATEGIES) == 9


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
    models = [{"name": "m", "baseModel": "o/m", "engineArgs": {"ok": 1, "nested": {"a": 1}, "lst": [1]}}]
    assert errors(ModelPool, pool(models=models)) == [
        "spec.models[0].engineArgs.nested: must be a string, number or boolean",
        "spec.models[0].engineArgs.lst: must be a string, number or boolean",
    ]
    args = {"b": True, "i": 3, "f": 0.9, "s": "bfloat16"}
    mp = ModelPool.model_validate(pool(models=[{"name": "m", "baseModel": "o/m", "engineArgs": args}]))
    assert mp.spec.models[0].engine_args == args
    assert type(mp.spec.models[0].engine_args["b"]) is bool


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
    def rp(**spec: Any) -> dict[str, Any]:
        return {"apiVersion": "corral.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "r"},
                "spec": {"poolRef": "p", **spec}}  # fmt: skip

    assert errors(RoutingPolicy, rp(ttftSloMs=-5)) == ["spec.ttftSloMs: should be greater than 0 (got -5)"]
    assert errors(RoutingPolicy, rp(blockSize=16.5))[0].startswith("spec.blockSize: Unsupported value: 16.5")
    rules = [{"name": "a", "target": "x"}, {"name": "a", "target": "y"}]
    assert errors(RoutingPolicy, rp(modelSelection={"rules": rules})) == [
        'spec.modelSelection.rules[1]: Duplicate value: {"name":"a"}'
    ]
    ok = RoutingPolicy.model_validate(
        rp(tenants={"secretRef": {"name": "keys"}}, adapterPaging={"pin": ["sql"]},
           modelSelection={"rules": [{"name": "a", "match": {"header": {"x-task": "sql"}}, "target": "sql"}]})
    )  # fmt: skip
    assert ok.spec.tenants is not None and ok.spec.tenants.secret_ref.key == "api-keys"
    assert errors(RoutingPolicy, rp(poolRef="Not_A_Name"))[0].startswith("spec.poolRef: should match")


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
        for n in draw(st.lists(NAME, max_size=5, unique=True))
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
