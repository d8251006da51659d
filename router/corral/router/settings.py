"""The one translation from the custom resources to the router's runtime settings.

:func:`router_settings` is a pure function of the :mod:`corral.api` models (a ``RoutingPolicy`` and,
when known, its ``ModelPool``) to :class:`RouterSettings`: the policy name and its params, the prefix
index mode, block size, queue bound, tenant isolation, the adapter catalog, per-model limits and
tokenizers, and each GPU class's resolved performance profile. The deployed router (Serve
``reconfigure``), the standalone router, the fleet benchmark and the operator all build their router from
this one function, so a field means the same thing everywhere and the defaults are the CRD's.

Every RoutingPolicy field is mapped here (``modelSelection`` is carried whole: the router compiles it,
:mod:`corral.router.selection`); :data:`POLICY_KNOBS` says which strategy takes which generic knob.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.api.admission import AdmissionSpec
from corral.api.modelpool import ModelPool
from corral.api.profiles import GpuProfile
from corral.api.routingpolicy import RoutingPolicy, RoutingPolicySpec
from corral.api.selection import ModelSelection

IndexMode = Literal["precise", "approximate"]

SLO_STRATEGIES = frozenset({"corral", "dualmap", "dualmap_paper"})
"""Strategies whose decisions use the TTFT SLO (``ttftSloMs`` -> ``ttft_slo_s``)."""

POLICY_KNOBS: dict[str, tuple[str, ...]] = {
    "corral": ("ttft_slo_s", "hotspot_c", "narrow_above"),
    "dualmap": ("ttft_slo_s",),
    "dualmap_paper": ("ttft_slo_s",),
}
"""Which policy params each strategy takes from the RoutingPolicy's generic fields. The other strategies
(the baselines) take none: the SLO, hotspot and two-choice knobs do not exist in those algorithms, and the
queue bound and index mode apply to every strategy in the router core, outside the policy."""


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What the router needs to know about one model of the pool."""

    name: str
    base_model: str
    max_model_len: int | None = None  # None: the engines' reported limit
    tokenizer: str | None = None  # file://PATH or PATH of a tokenizer.json (or its folder)


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    name: str
    base_model: str
    source: str
    rank: int
    tenant: str | None = None  # owner of a private adapter (ModelPool spec.adapters[].tenant)


@dataclass(frozen=True, slots=True)
class PagingSettings:
    """RoutingPolicy ``adapterPaging`` + ModelPool ``adapterCache``."""

    pin: tuple[str, ...] = ()
    prefetch_to_cpu: bool = True
    replication_demand_rps: float = 5.0
    gpu_slots: int = 4
    cpu_slots: int | None = None


_CRD = RoutingPolicySpec(pool_ref="defaults")
"""A RoutingPolicy spec with every field at the CRD default: the one source of the runtime defaults."""


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Everything a router runs with, derived from the CRs (see :func:`router_settings`)."""

    strategy: str = _CRD.strategy
    policy_params: Mapping[str, Any] = field(default_factory=lambda: policy_params(_CRD)[1])
    index_mode: IndexMode = _CRD.prefix_index
    block_size: int = _CRD.block_size
    ttft_slo_s: float = _CRD.ttft_slo_ms / 1000.0
    max_queue_per_replica: int = _CRD.load.max_queue_requests_per_replica
    isolate_tenants: bool = False
    tenant_secret: tuple[str, str] | None = None  # (Secret name, key)
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    adapters: Mapping[str, AdapterSettings] = field(default_factory=dict)
    profiles: Mapping[str, GpuProfile] = field(default_factory=dict)  # GPU class name -> resolved profile
    paging: PagingSettings = field(default_factory=PagingSettings)
    selection: ModelSelection = field(default_factory=lambda: _CRD.model_selection)  # spec.modelSelection
    admission: AdmissionSpec = field(default_factory=lambda: _CRD.admission)  # corral.router.admission


def policy_params(spec: RoutingPolicySpec) -> tuple[str, dict[str, Any]]:
    """(strategy, params) from a RoutingPolicy spec, per :data:`POLICY_KNOBS`."""
    knobs = {
        "ttft_slo_s": spec.ttft_slo_ms / 1000.0,
        "hotspot_c": spec.load.hotspot_factor,
        "narrow_above": spec.load.two_choice_above,
    }
    return spec.strategy, {k: knobs[k] for k in POLICY_KNOBS.get(spec.strategy, ())}


def default_params(strategy: str, ttft_slo_s: float | None = None) -> dict[str, Any]:
    """The params ``strategy`` gets from a RoutingPolicy at the CRD defaults (with that TTFT SLO)."""
    knobs = {
        "ttft_slo_s": _CRD.ttft_slo_ms / 1000.0 if ttft_slo_s is None else ttft_slo_s,
        "hotspot_c": _CRD.load.hotspot_factor,
        "narrow_above": _CRD.load.two_choice_above,
    }
    return {k: knobs[k] for k in POLICY_KNOBS.get(strategy, ())}


def default_policy_spec(pool_name: str = "pool") -> RoutingPolicySpec:
    """The RoutingPolicy a pool gets when none is given (every field at the CRD's default)."""
    return RoutingPolicySpec(pool_ref=pool_name)


def router_settings(
    policy: RoutingPolicy | RoutingPolicySpec | None, pool: ModelPool | None = None
) -> RouterSettings:
    """The router's settings for ``pool`` under ``policy`` (the defaults when ``policy`` is None). Pure."""
    if isinstance(policy, RoutingPolicy):
        spec = policy.spec
    elif policy is None:
        spec = default_policy_spec(pool.metadata.name if pool is not None and pool.metadata.name else "pool")
    else:
        spec = policy
    strategy, params = policy_params(spec)
    models: dict[str, ModelSettings] = {}
    adapters: dict[str, AdapterSettings] = {}
    profiles: dict[str, GpuProfile] = {}
    gpu_slots, cpu_slots = 4, None
    if pool is not None:
        ps = pool.spec
        for m in ps.models:
            models[m.name] = ModelSettings(m.name, m.base_model, m.max_model_len, m.tokenizer)
        for a in ps.adapters:
            adapters[a.name] = AdapterSettings(a.name, a.base_model, a.source, a.rank, a.tenant)
        for c in ps.gpu_classes:
            profiles[c.name] = c.gpu_profile()
        gpu_slots, cpu_slots = ps.adapter_cache.gpu_slots, ps.adapter_cache.effective_cpu_slots
    ap = spec.adapter_paging
    tenants = spec.tenants
    return RouterSettings(
        strategy=strategy,
        policy_params=params,
        index_mode=spec.prefix_index,
        block_size=int(spec.block_size),
        ttft_slo_s=spec.ttft_slo_ms / 1000.0,
        max_queue_per_replica=spec.load.max_queue_requests_per_replica,
        isolate_tenants=bool(tenants and tenants.isolate_cache),
        tenant_secret=(tenants.secret_ref.name, tenants.secret_ref.key) if tenants else None,
        models=models,
        adapters=adapters,
        profiles=profiles,
        paging=PagingSettings(
            pin=tuple(ap.pin),
            prefetch_to_cpu=ap.prefetch_to_cpu,
            replication_demand_rps=ap.replication_demand_rps,
            gpu_slots=gpu_slots,
            cpu_slots=cpu_slots,
        ),
        admission=spec.admission,
        selection=spec.model_selection,
    )
