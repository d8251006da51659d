"""Public entry point to the CRD models (``corral.dev/v1alpha1``): import models from here.

The definitions live in :mod:`corral.api.modelpool`, :mod:`corral.api.routingpolicy`,
:mod:`corral.api.selection` and
:mod:`corral.api.common`; this module re-exports them and owns :data:`KINDS`, the kind -> model table
used by the CRD generator and ``corral validate``.
"""

from __future__ import annotations

from .common import API_VERSION, GROUP, VERSION, CelRule, Condition, CorralModel, CrdInfo, ObjectMeta
from .modelpool import (
    Adapter,
    AdapterCache,
    AdapterResidency,
    GpuClass,
    GpuClassStatus,
    ModelPool,
    ModelPoolSpec,
    ModelPoolStatus,
    ModelSpec,
    ProfileOverrides,
)
from .routingpolicy import (
    STRATEGIES,
    AdapterPaging,
    LoadSpec,
    ModelSelection,
    RouterStatus,
    RoutingPolicy,
    RoutingPolicySpec,
    RoutingPolicyStatus,
    SecretKeyRef,
    Tenants,
)
from .selection import SelectionRule, Signal

KINDS: dict[str, type[ModelPool] | type[RoutingPolicy]] = {
    "ModelPool": ModelPool,
    "RoutingPolicy": RoutingPolicy,
}
"""Top-level models by ``kind``; each has a ``crd`` class attribute (:class:`CrdInfo`)."""

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "STRATEGIES",
    "VERSION",
    "Adapter",
    "AdapterCache",
    "AdapterPaging",
    "AdapterResidency",
    "CelRule",
    "Condition",
    "CorralModel",
    "CrdInfo",
    "GpuClass",
    "GpuClassStatus",
    "LoadSpec",
    "ModelPool",
    "ModelPoolSpec",
    "ModelPoolStatus",
    "ModelSelection",
    "ModelSpec",
    "ObjectMeta",
    "ProfileOverrides",
    "RouterStatus",
    "RoutingPolicy",
    "RoutingPolicySpec",
    "RoutingPolicyStatus",
    "SecretKeyRef",
    "SelectionRule",
    "Signal",
    "Tenants",
]
