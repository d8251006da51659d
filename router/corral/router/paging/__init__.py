"""Adapter paging: keep LoRA adapters where demand is, ahead of the requests that need them.

The engines load an adapter on demand when a request names one that is not resident, which costs a
disk->GPU load on the request's critical path (the "thrash cliff"). Paging moves that work off the
request path, in two halves:

- :mod:`.planning` (pure): demand per adapter -> replica targets -> load/unload/prefetch actions
  (:class:`AdapterPlanner`), unit-tested with a fake clock;
- :mod:`.executing`: :class:`AdapterPager` runs the planner every ``interval_s`` and executes its actions
  through an :class:`AdapterControl` (the engine endpoints' ``LoadAdapter`` / ``UnloadAdapter``).

Fetching adapter weights from their source URI is the engines' job: :mod:`corral.serve.adapter_sources`.
No Ray import: the router process runs this, and so do the benchmarks and tests.
"""

from __future__ import annotations

from .executing import AdapterControl, AdapterPager
from .planning import (
    Action,
    AdapterInfo,
    AdapterPlanner,
    DemandTracker,
    FleetView,
    PagerStats,
    PagingConfig,
    ReplicaView,
    Tier,
)

__all__ = [
    "Action",
    "AdapterControl",
    "AdapterInfo",
    "AdapterPager",
    "AdapterPlanner",
    "DemandTracker",
    "FleetView",
    "PagerStats",
    "PagingConfig",
    "ReplicaView",
    "Tier",
]
