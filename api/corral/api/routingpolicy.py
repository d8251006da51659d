"""The ``RoutingPolicy`` custom resource (``corral.dev/v1alpha1``, short name ``rp``).

A RoutingPolicy tells the Corral router how to pick an engine replica for a ModelPool's requests: the
strategy (Corral's cost model or a baseline), the KV block size used for prefix hashing, the TTFT SLO,
load guards, adapter paging hints, model-selection rules and where tenant API keys live. This module owns
its spec, status and rules. Changes hot-reload into running routers (Serve ``user_config``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from .admission import AdmissionSpec
from .common import (
    AGE_COLUMN,
    NAME_MAX,
    NAME_PATTERN,
    READY_COLUMN,
    Condition,
    CorralModel,
    CrdInfo,
    K8sBool,
    K8sFloat,
    K8sInt,
    ObjectMeta,
    PrinterColumn,
    conditions_field,
    list_map,
    list_set,
    name_field,
    raise_issues,
    set_duplicates,
)
from .selection import ModelSelection

__all__ = ["ModelSelection"]  # re-exported: the selection schema lives in corral.api.selection

Strategy = Literal[
    "corral",
    "round_robin",
    "random",
    "least_loaded",
    "pow2",
    "chbl",
    "approx_prefix",
    "precise_prefix",
    "dualmap",
    "dualmap_paper",
    "lora_affinity",
]
"""``corral`` (the cost model) or a baseline of ``corral.router.policies`` (same names as the bench)."""

STRATEGIES: tuple[str, ...] = Strategy.__args__  # type: ignore[attr-defined]

BlockSize = Literal[8, 16, 32, 64, 128]
"""KV cache block sizes vLLM supports; prefix hashing must use the engines' block size."""

PrefixIndex = Literal["precise", "approximate"]
"""Source of the router's prefix index: engine KV events, or the router's own dispatch record."""

MAX_PINNED = 256

AdapterName = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]


class LoadSpec(CorralModel):
    """Load guards applied on top of the strategy."""

    max_queue_requests_per_replica: K8sInt = Field(
        default=128,
        ge=1,
        le=100_000,
        description=(
            "Requests sent to a replica and not yet started (router count, or the engine's own if larger; "
            "requests held for it in the router's queue by dualmap_paper included) at which it takes no "
            "more; when every replica is at it, requests get 429 with Retry-After."
        ),
    )
    hotspot_factor: K8sFloat = Field(
        default=3.0,
        gt=1.0,
        le=10.0,
        description=(
            "Hotspot bound c (> 1): no replica is given work while its queued prefill time exceeds c x the "
            "fleet's mean (and half the TTFT SLO)."
        ),
    )
    two_choice_above: K8sInt = Field(
        default=16,
        ge=1,
        le=100_000,
        description="With more candidate replicas than this, score two random candidates (power of two).",
    )


class AdapterPaging(CorralModel):
    """Hints for the adapter paging manager."""

    @model_validator(mode="after")
    def _unique(self) -> AdapterPaging:
        raise_issues(set_duplicates(self.pin, ".pin"))
        return self

    pin: list[AdapterName] = Field(
        default_factory=list,
        max_length=MAX_PINNED,
        description="Adapters kept resident in a GPU slot on every replica (unique names).",
        json_schema_extra=list_set(),
    )
    prefetch_to_cpu: K8sBool = Field(
        default=True, description="Prefetch adapters with rising demand into host memory."
    )
    replication_demand_rps: K8sFloat = Field(
        default=5.0,
        gt=0,
        le=1e6,
        description="Demand (requests/s) per replica above which an adapter is loaded on another replica.",
    )


class SecretKeyRef(CorralModel):
    """A key in a Secret of the same namespace."""

    name: str = name_field("Secret name.")
    key: str = Field(default="api-keys", min_length=1, max_length=253, description="Key in the Secret.")


class Tenants(CorralModel):
    """Tenant authentication."""

    secret_ref: SecretKeyRef = Field(description="Secret key holding the tenants' API keys.")
    isolate_cache: K8sBool = Field(
        default=False, description="Salt prefix hashes by tenant so tenants never share cached prefixes."
    )


class RoutingPolicySpec(CorralModel):
    """Desired routing behaviour for one ModelPool."""

    pool_ref: str = name_field("Name of the ModelPool (same namespace) this policy routes.")
    strategy: Strategy = Field(
        default="corral",
        description="'corral' (cost model) or a baseline: round_robin, random, least_loaded, pow2, chbl, "
        "approx_prefix, precise_prefix, dualmap, dualmap_paper (DualMap with router-side queues and "
        "hotspot migration), lora_affinity.",
    )
    block_size: BlockSize = Field(
        default=16, description="KV cache block size in tokens used for prefix hashing (8..128)."
    )
    prefix_index: PrefixIndex = Field(
        default="precise",
        description=(
            "Where the router's prefix index comes from: 'precise' (the engines' KV block events) or "
            "'approximate' (the router's own record of what it sent where)."
        ),
    )
    ttft_slo_ms: K8sFloat = Field(
        default=2000.0, gt=0, le=600_000, description="Time-to-first-token SLO in milliseconds (> 0)."
    )
    load: LoadSpec = Field(
        default_factory=LoadSpec, description="Load guards.", json_schema_extra={"default": {}}
    )
    adapter_paging: AdapterPaging = Field(
        default_factory=AdapterPaging, description="Adapter paging hints.", json_schema_extra={"default": {}}
    )
    model_selection: ModelSelection = Field(
        default_factory=ModelSelection,
        description="Model and adapter selection: signals, rules, bandits (requests naming its model).",
        json_schema_extra={"default": {}},
    )
    tenants: Tenants | None = Field(default=None, description="Tenant API keys; open access if unset.")
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec, description="Admission control.", json_schema_extra={"default": {}})  # noqa: E501  # fmt: skip


class RouterStatus(CorralModel):
    """One router instance that has loaded this policy."""

    id: str = Field(max_length=253, description="Router instance id.")
    ready: K8sBool = Field(default=False, description="Whether the router serves traffic.")
    policy_generation: K8sInt | None = Field(
        default=None, ge=0, description="metadata.generation of the policy the router runs."
    )


class RoutingPolicyStatus(CorralModel):
    """Observed state of a RoutingPolicy, written by the operator."""

    observed_generation: K8sInt | None = Field(
        default=None, ge=0, description="Last metadata.generation seen."
    )
    conditions: list[Condition] = conditions_field()
    active_strategy: Strategy | None = Field(default=None, description="Strategy the routers run now.")
    routers: list[RouterStatus] = Field(
        default_factory=list,
        max_length=256,
        description="Router instances and the policy generation each runs.",
        json_schema_extra=list_map("id"),
    )


class RoutingPolicy(CorralModel):
    """How the Corral router places one ModelPool's requests on its replicas."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        kind="RoutingPolicy",
        plural="routingpolicies",
        singular="routingpolicy",
        short_names=("rp",),
        printer_columns=(
            PrinterColumn("Pool", ".spec.poolRef", description="ModelPool routed by this policy."),
            PrinterColumn("Strategy", ".spec.strategy", description="Requested strategy."),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )

    api_version: Literal["corral.dev/v1alpha1"] = Field(
        default="corral.dev/v1alpha1", description="corral.dev/v1alpha1"
    )
    kind: Literal["RoutingPolicy"] = Field(default="RoutingPolicy", description="RoutingPolicy")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: RoutingPolicySpec = Field(description="Desired state.")
    status: RoutingPolicyStatus | None = Field(default=None, description="Observed state (operator-written).")
