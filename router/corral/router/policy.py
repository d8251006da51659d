"""The policy interface and registry: every routing policy (the Corral cost model and each baseline)
is one small class behind this interface, selectable by name from a RoutingPolicy or the benchmark.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from .state import FleetState
from .types import Decision, RoutingRequest


class NoReplicaError(LookupError):
    """No healthy replica serves the requested model."""


class Policy(ABC):
    """Chooses a replica for a request. Synchronous, no I/O; reads only ``FleetState``."""

    name: ClassVar[str]

    @abstractmethod
    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        """Return the decision (with ``candidates`` cost terms filled when ``explain``)."""


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def deco(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def make_policy(name: str, **params: Any) -> Policy:
    from . import policies  # noqa: F401  (registers the built-in policies)

    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**params)


def policy_names() -> list[str]:
    from . import policies  # noqa: F401

    return sorted(_REGISTRY)
