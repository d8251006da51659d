"""Built-in routing policies, one module each (see README.md), and their registry.

``BUILTIN_POLICIES`` is the explicit registry every router and benchmark uses unless handed another;
:func:`make_policy` / :func:`policy_names` are shorthands for it.
"""

from __future__ import annotations

from typing import Any

from ..policy import Policy, PolicyRegistry
from .approx_prefix import ApproxPrefix
from .chbl import ConsistentHashBoundedLoads
from .corral import Corral
from .dualmap import DualMap
from .dualmap_paper import DualMapPaper
from .least_loaded import LeastLoaded
from .lora_affinity import LoraAffinity
from .pow2 import PowerOfTwo
from .precise_prefix import PrecisePrefix
from .random_pick import RandomPick
from .round_robin import RoundRobin

BUILTIN_POLICIES = PolicyRegistry(
    [
        Corral,
        RoundRobin,
        RandomPick,
        LeastLoaded,
        PowerOfTwo,
        ConsistentHashBoundedLoads,
        ApproxPrefix,
        PrecisePrefix,
        DualMap,
        DualMapPaper,
        LoraAffinity,
    ]
)


def make_policy(name: str, **params: Any) -> Policy:
    """A built-in policy by name (``ValueError`` on an unknown name or a bad param)."""
    return BUILTIN_POLICIES.make(name, **params)


def policy_names() -> list[str]:
    return BUILTIN_POLICIES.names()


__all__ = ["BUILTIN_POLICIES", "Policy", "PolicyRegistry", "make_policy", "policy_names"]
