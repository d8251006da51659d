"""The policy interface and the registry type: every routing policy (the Corral cost model and each
baseline) is one small class behind :class:`Policy`, selectable by name through a :class:`PolicyRegistry`.

The built-in policies and their registry (``BUILTIN_POLICIES``, ``make_policy``) live in
:mod:`corral.router.policies`; this module imports none of them, so there is no import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from .state import FleetState
from .types import Decision, RoutingRequest


class NoReplicaError(LookupError):
    """No healthy replica serves the requested model."""


class Policy(ABC):
    """Chooses a replica for a request. Synchronous, no I/O; reads only ``FleetState``.

    ``fleet`` may be a :class:`~corral.router.state.FleetView` that hides some replicas (a retry's
    exclusions): ``fleet.candidates(model)`` are the ones to choose from, ``fleet.members(model)`` all
    healthy members (what hash rings are built from, so an exclusion never rebuilds a ring).
    """

    name: ClassVar[str]

    @abstractmethod
    def choose(self, req: RoutingRequest, fleet: FleetState, now: float, explain: bool = False) -> Decision:
        """Return the decision (with ``candidates`` cost terms filled when ``explain``)."""


class PolicyRegistry:
    """Policy classes by name. Explicit: a router or benchmark is handed the registry it uses."""

    def __init__(self, classes: Iterable[type[Policy]] = ()) -> None:
        self._classes: dict[str, type[Policy]] = {}
        for cls in classes:
            self.add(cls)

    def add(self, cls: type[Policy]) -> type[Policy]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"policy class {cls.__name__} has no name")
        if name in self._classes:
            raise ValueError(f"policy {name!r} registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def make(self, name: str, **params: Any) -> Policy:
        """A new policy instance; ``ValueError`` naming the known policies, or the bad param."""
        try:
            cls = self._classes[name]
        except KeyError:
            raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(self.names())}") from None
        return cls(**params)
