"""The ``ModelPool`` custom resource (``corral.dev/v1alpha1``, short name ``mp``).

A ModelPool says which base models run, on which GPU classes and how many replicas of each, and which
LoRA adapters the replicas serve from a two-tier adapter cache. This module owns its spec, status and
cross-field rules (each rule is a :class:`~corral.api.common.CelRule` used by both the CRD and Python).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .common import (
    AGE_COLUMN,
    NAME_MAX,
    NAME_PATTERN,
    NOT_FINITE,
    READY_COLUMN,
    TENANT_MAX,
    TENANT_PATTERN,
    CelRule,
    Condition,
    CorralModel,
    CrdInfo,
    Issue,
    K8sFloat,
    K8sInt,
    ObjectMeta,
    PrinterColumn,
    cel,
    conditions_field,
    duplicates,
    list_map,
    name_field,
    raise_issues,
    rule_error,
)
from .names import qualified_name
from .profiles import BUILTIN_PROFILES, GpuProfile, resolve_profile

Engine = Literal["sim", "vllm"]
ProfileName = Literal["H100", "A100-80GB", "L4"]
assert set(ProfileName.__args__) == set(BUILTIN_PROFILES), "ProfileName must list BUILTIN_PROFILES"  # type: ignore[attr-defined]


MAX_MODELS = 16
MAX_GPU_CLASSES = 16
MAX_ADAPTERS = 512
MAX_SELECTOR_LABELS = 32
MAX_ENGINE_ARGS = 64
MAX_URI = 1024

# ---------------------------------------------------------------------------------------------- rules

SOURCE_PATTERN = (
    r"^(file://\S+"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+"
    r"|hf://[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?)$"
)
_SOURCE_RE = re.compile(SOURCE_PATTERN)

RULE_MAX_GE_MIN = CelRule(
    rule="self.maxReplicas >= self.minReplicas",
    field_path=".maxReplicas",
    message="must be >= minReplicas",
    message_expression=(
        "'must be >= minReplicas (got %d < %d)'.format([self.maxReplicas, self.minReplicas])"
    ),
)
RULE_REPLICAS_IN_RANGE = CelRule(
    rule="!has(self.replicas) || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)",
    field_path=".replicas",
    message="must be within [minReplicas, maxReplicas]",
    message_expression=(
        "'must be within [minReplicas, maxReplicas] (got %d not in [%d, %d])'"
        ".format([self.replicas, self.minReplicas, self.maxReplicas])"
    ),
)
RULE_CPU_GE_GPU_SLOTS = CelRule(
    rule="!has(self.cpuSlots) || self.cpuSlots >= self.gpuSlots",
    field_path=".cpuSlots",
    message="must be >= gpuSlots",
    message_expression=("'must be >= gpuSlots (got %d < %d)'.format([self.cpuSlots, self.gpuSlots])"),
)
RULE_SOURCE_URI = CelRule(
    rule=f"self.source.matches(r'{SOURCE_PATTERN}')",
    field_path=".source",
    message="must be a file://PATH, s3://BUCKET/KEY or hf://ORG/REPO[@REV] URI",
    message_expression=(
        "'must be a file://PATH, s3://BUCKET/KEY or hf://ORG/REPO[@REV] URI (got \"%s\")'"
        ".format([self.source])"
    ),
)
BASE_MODEL_UNKNOWN = "must name a model in spec.models"
RULE_ADAPTER_BASE_MODEL = CelRule(
    rule="!has(self.adapters) || self.adapters.all(a, self.models.exists(m, m.name == a.baseModel))",
    field_path=".adapters",
    message=f"adapters[].baseModel: {BASE_MODEL_UNKNOWN}",
    message_expression=(
        "'adapters[].baseModel: must name a model in spec.models (got %s)'.format([self.adapters.filter(a, "
        "!self.models.exists(m, m.name == a.baseModel)).map(a, a.baseModel)])"
    ),
)

ENGINE_ARG_SCALAR = "must be a string, number or boolean"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
"""A Kubernetes label value (at most 63 characters): empty, or alphanumerics with '-', '_', '.' inside."""
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
RULE_NODE_SELECTOR_KEYS = CelRule(
    rule="self.all(k, !format.qualifiedName().validate(k).hasValue())",
    message=(
        "keys must be Kubernetes label keys ([PREFIX/]NAME: NAME at most 63 alphanumerics, '-', '_' or '.', "
        "starting and ending alphanumeric; PREFIX a DNS subdomain)"
    ),
)
NAME_CLASH = "adapter names must differ from model names (clients request both as `model`)"
RULE_ADAPTER_MODEL_NAME_CLASH = CelRule(
    rule="!has(self.adapters) || self.adapters.all(a, !self.models.exists(m, m.name == a.name))",
    field_path=".adapters",
    message=NAME_CLASH,
    message_expression=(
        f"'{NAME_CLASH} (got %s)'.format([self.adapters.filter(a, self.models.exists(m, m.name == a.name))"
        ".map(a, a.name)])"
    ),
)


def cel_list(values: list[str]) -> str:
    """A list of strings as CEL's ``%s`` formats it (``["a", "b"]``)."""
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


# ------------------------------------------------------------------------------------------------ spec


class ModelSpec(CorralModel):
    """One base model served by the pool."""

    name: str = name_field("Name of the model in the pool; clients request it by this name.")
    base_model: str = Field(
        min_length=1,
        max_length=256,
        description="Weights to load: a Hugging Face model id (org/name) or a local path.",
    )
    engine: Engine = Field(default="sim", description="Engine: 'sim' (CPU simulator) or 'vllm' (GPU).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_ENGINE_ARGS,
        description="Extra engine arguments (string, number or boolean values), e.g. vLLM's enforce_eager.",
        # Untyped values (a structural schema has no "scalar" type); an object or a list value may hold no
        # item, which leaves strings, numbers and booleans (CEL cannot inspect untyped values).
        json_schema_extra={
            "additionalProperties": {
                "x-kubernetes-preserve-unknown-fields": True,
                "maxProperties": 0,
                "maxItems": 0,
            }
        },
    )
    max_model_len: K8sInt | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="Maximum context length in tokens (engine default if unset).",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=(
            "Tokenizer the router hashes prompts with, so its blocks line up with the engine's: file://PATH "
            "(or a plain PATH) of a Hugging Face tokenizer.json, or of a folder holding tokenizer.json and "
            "optionally tokenizer_config.json with a chat_template. Unset: the tokenizer the engine reports "
            "at registration (vLLM), else the simulator's byte tokenizer."
        ),
    )

    @field_validator("engine_args")
    @classmethod
    def _scalar_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        issues: list[Issue] = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                what = "object" if isinstance(v, dict) else "list"
                msg = (
                    f"{ENGINE_ARG_SCALAR} (a non-empty {what}: Too many: {len(v)}: must have at most 0 items)"
                )
                issues.append((f".{k}", msg))
            elif isinstance(v, float) and not math.isfinite(v):
                issues.append((f".{k}", NOT_FINITE))
        raise_issues(issues)
        # a null value is dropped, as the apiserver drops it
        return {k: v for k, v in value.items() if v is not None}


class ProfileOverrides(CorralModel):
    """Inline overrides of a built-in GPU performance profile (sim engine and router cost model)."""

    b0_us: K8sFloat | None = Field(default=None, ge=0, description="Fixed cost of one engine step, us.")
    b1_us: K8sFloat | None = Field(default=None, ge=0, description="Cost per prefill token in a step, us.")
    b2_us: K8sFloat | None = Field(default=None, ge=0, description="Cost per decode token in a step, us.")
    kv_capacity_tokens: K8sInt | None = Field(default=None, ge=1, description="Tokens the KV cache holds.")
    max_num_batched_tokens: K8sInt | None = Field(default=None, ge=1, description="Token budget of one step.")
    max_num_seqs: K8sInt | None = Field(default=None, ge=1, description="Maximum running sequences.")
    lora_cpu_to_gpu_ms_per_mb: K8sFloat | None = Field(
        default=None, ge=0, description="Host->GPU adapter copy time per MB, ms."
    )
    lora_disk_to_cpu_ms_per_mb: K8sFloat | None = Field(
        default=None, ge=0, description="Disk->host adapter read and deserialisation time per MB, ms."
    )
    lora_load_fixed_ms: K8sFloat | None = Field(
        default=None, ge=0, description="Fixed cost of any adapter load, ms."
    )


class GpuClass(CorralModel):
    """A class of identical GPU nodes and how many engine replicas run on it."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_MAX_GE_MIN, RULE_REPLICAS_IN_RANGE))

    name: str = name_field("Name of the GPU class, e.g. 'h100'.")
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_SELECTOR_LABELS,
        description="Node labels that select this class's nodes, e.g. nvidia.com/gpu.product.",
        json_schema_extra=cel(RULE_NODE_SELECTOR_KEYS),
    )
    gpus_per_replica: K8sInt = Field(default=1, ge=1, le=16, description="GPUs per engine replica.")
    min_replicas: K8sInt = Field(default=1, ge=0, le=1024, description="Lower bound for autoscaling.")
    max_replicas: K8sInt = Field(ge=0, le=1024, description="Upper bound for autoscaling; >= minReplicas.")
    replicas: K8sInt | None = Field(
        default=None,
        ge=0,
        le=1024,
        description="Desired replicas, within [minReplicas, maxReplicas]; minReplicas if unset.",
    )
    profile: ProfileName = Field(
        default="H100", description="Built-in GPU performance profile: H100, A100-80GB or L4."
    )
    profile_overrides: ProfileOverrides | None = Field(
        default=None, description="Inline overrides of the profile's numbers."
    )
    accelerator_type: str | None = Field(
        default=None, max_length=63, description="Ray accelerator_type resource, e.g. 'H100' or 'A100-80G'."
    )

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if qualified_name(k)]
        if bad:
            raise rule_error([("", f"{RULE_NODE_SELECTOR_KEYS.message} (got {cel_list(bad)})")])
        return value

    @model_validator(mode="after")
    def _rules(self) -> GpuClass:
        issues: list[Issue] = []
        if self.max_replicas < self.min_replicas:
            issues.append(
                (".maxReplicas", f"{RULE_MAX_GE_MIN.message} (got {self.max_replicas} < {self.min_replicas})")
            )
        r = self.replicas
        if r is not None and not (self.min_replicas <= r <= self.max_replicas):
            issues.append(
                (
                    ".replicas",
                    f"{RULE_REPLICAS_IN_RANGE.message} (got {r} not in "
                    f"[{self.min_replicas}, {self.max_replicas}])",
                )
            )
        raise_issues(issues)
        return self

    @property
    def desired_replicas(self) -> int:
        """``replicas`` if set, else ``minReplicas``."""
        return self.min_replicas if self.replicas is None else self.replicas

    def gpu_profile(self) -> GpuProfile:
        """The resolved performance profile: the built-in one with ``profileOverrides`` applied."""
        overrides = self.profile_overrides.model_dump(exclude_none=True) if self.profile_overrides else None
        return resolve_profile(self.profile, overrides)


class Adapter(CorralModel):
    """A LoRA adapter served on top of one of the pool's models."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_SOURCE_URI))

    name: str = name_field("Adapter name; clients request it as the model name.")
    base_model: str = Field(
        min_length=1, max_length=63, description="Name of the pool model (spec.models[].name) it adapts."
    )
    rank: K8sInt = Field(default=16, ge=1, le=512, description="LoRA rank r.")
    source: str = Field(
        min_length=1,
        max_length=MAX_URI,
        description="Where the weights are: file://PATH, s3://BUCKET/KEY or hf://ORG/REPO[@REV].",
    )
    tenant: str | None = Field(
        default=None,
        min_length=1,
        max_length=TENANT_MAX,
        pattern=TENANT_PATTERN,
        description=(
            "Owner tenant of a private adapter: only that tenant's API keys (RoutingPolicy spec.tenants) can "
            "use it or see it in /v1/models; for other tenants it does not exist. Unset: public."
        ),
    )

    @model_validator(mode="after")
    def _rules(self) -> Adapter:
        if not _SOURCE_RE.match(self.source):
            raise rule_error([(".source", f'{RULE_SOURCE_URI.message} (got "{self.source}")')])
        return self


class AdapterCache(CorralModel):
    """Adapter slots per replica: GPU slots (vLLM max_loras) and host-memory slots (max_cpu_loras)."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_CPU_GE_GPU_SLOTS))

    gpu_slots: K8sInt = Field(
        default=4, ge=1, le=256, description="Adapters resident on the GPU (max_loras)."
    )
    cpu_slots: K8sInt | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Adapters kept in host memory (max_cpu_loras), >= gpuSlots; gpuSlots if unset.",
    )

    @model_validator(mode="after")
    def _rules(self) -> AdapterCache:
        if self.cpu_slots is not None and self.cpu_slots < self.gpu_slots:
            msg = f"{RULE_CPU_GE_GPU_SLOTS.message} (got {self.cpu_slots} < {self.gpu_slots})"
            raise rule_error([(".cpuSlots", msg)])
        return self

    @property
    def effective_cpu_slots(self) -> int:
        return self.gpu_slots if self.cpu_slots is None else self.cpu_slots


class KvOffload(CorralModel):
    """A CPU KV tier per engine replica: KV blocks kept in host memory past the GPU prefix cache and copied
    back on a hit instead of recomputed (vLLM ``--kv-offloading-size`` / ``--kv-offloading-backend``;
    the simulator models it with the same size, see corral.serve.sim.kv_offload)."""

    cpu_gib: K8sFloat = Field(
        default=0.0,
        ge=0,
        le=65536,
        description="Host memory per replica for offloaded KV blocks, GiB; 0 = no CPU KV tier.",
    )
    backend: Literal["native", "lmcache"] = Field(
        default="native",
        description="Offloading on vLLM engines: 'native' (vLLM's own CPU offloading) or 'lmcache'.",
    )


class ModelPoolSpec(CorralModel):
    """Desired state of a ModelPool."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_ADAPTER_BASE_MODEL, RULE_ADAPTER_MODEL_NAME_CLASH))

    models: list[ModelSpec] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description="Base models served by the pool (unique names).",
        json_schema_extra=list_map(),
    )
    gpu_classes: list[GpuClass] = Field(
        min_length=1,
        max_length=MAX_GPU_CLASSES,
        description="GPU classes the engine replicas run on (unique names).",
        json_schema_extra=list_map(),
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="LoRA adapters served by the pool (unique names).",
        json_schema_extra=list_map(),
    )
    adapter_cache: AdapterCache = Field(
        default_factory=AdapterCache,
        description="Adapter slots per replica.",
        json_schema_extra={"default": {}},
    )
    kv_offload: KvOffload = Field(
        default_factory=KvOffload,
        description="CPU KV tier per replica (KV cache offloading to host memory).",
        json_schema_extra={"default": {}},
    )
    routing_policy_ref: str | None = Field(
        default=None,
        min_length=1,
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description="Name of the RoutingPolicy (same namespace) that routes this pool's traffic.",
    )

    @model_validator(mode="after")
    def _rules(self) -> ModelPoolSpec:
        issues: list[Issue] = []
        issues += duplicates([m.name for m in self.models], ".models")
        issues += duplicates([g.name for g in self.gpu_classes], ".gpuClasses")
        issues += duplicates([a.name for a in self.adapters], ".adapters")
        models = {m.name for m in self.models}
        for i, a in enumerate(self.adapters):
            if a.base_model not in models:
                msg = f'{BASE_MODEL_UNKNOWN} (got "{a.base_model}")'
                issues.append((f".adapters[{i}].baseModel", msg))
        clash = [a.name for a in self.adapters if a.name in models]
        if clash:
            issues.append((".adapters", f"{NAME_CLASH} (got {cel_list(clash)})"))
        raise_issues(issues)
        return self


# ---------------------------------------------------------------------------------------------- status


class GpuClassStatus(CorralModel):
    """Replica counts of one GPU class."""

    name: str = Field(max_length=63, description="GPU class name.")
    desired_replicas: K8sInt = Field(default=0, ge=0, description="Replicas the operator asked for.")
    ready_replicas: K8sInt = Field(default=0, ge=0, description="Replicas that are serving.")


class AdapterResidency(CorralModel):
    """Where one adapter is loaded right now."""

    name: str = Field(max_length=63, description="Adapter name.")
    gpu_replicas: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=1024, description="Replica ids holding the adapter in a GPU slot."
    )
    cpu_replicas: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=1024, description="Replica ids holding the adapter in host memory."
    )


class ModelPoolStatus(CorralModel):
    """Observed state of a ModelPool, written by the operator."""

    observed_generation: K8sInt | None = Field(
        default=None, ge=0, description="Last metadata.generation seen."
    )
    conditions: list[Condition] = conditions_field()
    model_count: K8sInt | None = Field(default=None, ge=0, description="Models in the spec (printer column).")
    adapter_count: K8sInt | None = Field(
        default=None, ge=0, description="Adapters in the spec (printer column)."
    )
    desired_replicas: K8sInt | None = Field(default=None, ge=0, description="Sum of desired replicas.")
    ready_replicas: K8sInt | None = Field(default=None, ge=0, description="Sum of ready replicas.")
    gpu_classes: list[GpuClassStatus] = Field(
        default_factory=list,
        max_length=MAX_GPU_CLASSES,
        description="Replica counts per GPU class.",
        json_schema_extra=list_map(),
    )
    adapter_residency: list[AdapterResidency] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="Where each adapter is loaded (replica ids per tier).",
        json_schema_extra=list_map(),
    )


# ------------------------------------------------------------------------------------------ top level


class ModelPool(CorralModel):
    """A pool of base models and LoRA adapters served on one or more GPU classes."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        kind="ModelPool",
        plural="modelpools",
        singular="modelpool",
        short_names=("mp",),
        printer_columns=(
            READY_COLUMN,
            PrinterColumn("Models", ".status.modelCount", "integer", "Number of base models."),
            PrinterColumn("Adapters", ".status.adapterCount", "integer", "Number of LoRA adapters."),
            PrinterColumn("Replicas", ".status.readyReplicas", "integer", "Ready engine replicas."),
            AGE_COLUMN,
        ),
    )

    api_version: Literal["corral.dev/v1alpha1"] = Field(
        default="corral.dev/v1alpha1", description="corral.dev/v1alpha1"
    )
    kind: Literal["ModelPool"] = Field(default="ModelPool", description="ModelPool")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: ModelPoolSpec = Field(description="Desired state.")
    status: ModelPoolStatus | None = Field(default=None, description="Observed state (operator-written).")
