"""Adapter paging, executing half: run the planner's actions through an :class:`AdapterControl`.

:class:`AdapterPager` owns an :class:`~corral.router.paging.planning.AdapterPlanner` and an
:class:`AdapterControl` (implemented over the engine endpoints' ``LoadAdapter`` / ``UnloadAdapter`` RPCs by
the Serve router deployment, or in-process in tests). Every ``interval_s`` it plans, then executes: per
replica in order (unloads before the loads they make room for), replicas in parallel; failures are
counted and logged, never raised. It learns the outcome from the engines' own adapter events (through the
fleet view the planner reads) and tells the planner what it did meanwhile.

Fetching the weights is not the router's job: the engine fetches the source URI it is given
(:mod:`corral.serve.adapter_sources`). No Ray import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from .planning import (
    Action,
    AdapterInfo,
    AdapterPlanner,
    DemandTracker,
    FleetView,
    PagerStats,
    PagingConfig,
    Tier,
)

log = logging.getLogger(__name__)


class AdapterControl(Protocol):
    """Load/unload adapters on one engine replica (engine endpoint RPCs, or in-process for tests)."""

    async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: Tier) -> None: ...

    async def unload_adapter(self, replica_id: str, adapter: str) -> None: ...


class AdapterPager:
    """Plans (:class:`AdapterPlanner`) and executes (:class:`AdapterControl`) adapter placement from demand.
    One per router process (or per paging-lease holder)."""

    def __init__(
        self,
        fleet: FleetView,
        control: AdapterControl,
        adapters: Iterable[AdapterInfo],
        config: PagingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.planner = AdapterPlanner(fleet, adapters, config, clock)
        self.control = control

    # -- the planner's state, for callers of the pager --
    @property
    def config(self) -> PagingConfig:
        return self.planner.config

    @property
    def clock(self) -> Callable[[], float]:
        return self.planner.clock

    @property
    def demand(self) -> DemandTracker:
        return self.planner.demand

    @property
    def stats(self) -> PagerStats:
        return self.planner.stats

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return self.planner.adapters

    def on_dispatch(self, adapter: str | None, now: float | None = None) -> None:
        """Record one request for ``adapter`` (call from the router's dispatch path; cheap)."""
        self.planner.on_dispatch(adapter, now)

    def update(
        self, adapters: Iterable[AdapterInfo] | None = None, config: PagingConfig | None = None
    ) -> None:
        """Apply a changed ModelPool adapter list or RoutingPolicy paging section (keeps demand)."""
        self.planner.update(adapters, config)

    def set_external_demand(self, rates: Mapping[str, float]) -> None:
        self.planner.set_external_demand(rates)

    def target(self, adapter: str, n_candidates: int, now: float) -> int:
        return self.planner.target(adapter, n_candidates, now)

    def plan(self, now: float | None = None) -> list[Action]:
        return self.planner.plan(now)

    # -- execution --
    async def execute(self, actions: Sequence[Action]) -> None:
        """Run the actions (unloads before the loads they make room for; per replica in order)."""
        per_replica: dict[str, list[Action]] = {}
        for a in actions:
            per_replica.setdefault(a.replica_id, []).append(a)

        async def run_one(rid: str, acts: list[Action]) -> None:
            planner = self.planner
            for a in acts:
                try:
                    if a.kind == "unload":
                        await self.control.unload_adapter(rid, a.adapter)
                        self.stats.unloads += 1
                        planner.record_unloaded(rid, a.adapter)
                    else:
                        planner.mark_pending(rid, a.adapter)
                        try:
                            await self.control.load_adapter(
                                rid, a.adapter, self.adapters[a.adapter].source, a.tier
                            )
                        finally:
                            planner.clear_pending(rid, a.adapter)
                        if a.tier == "gpu":
                            self.stats.loads += 1
                            planner.record_loaded(rid, a.adapter)
                        else:
                            self.stats.prefetches += 1
                            planner.record_prefetched(rid, a.adapter)
                except Exception as e:
                    self.stats.failures += 1
                    log.warning("adapter paging: %s %s on %s failed: %s", a.kind, a.adapter, rid, e)

        await asyncio.gather(*(run_one(rid, acts) for rid, acts in per_replica.items()))

    async def step(self, now: float | None = None) -> list[Action]:
        actions = self.plan(now)
        if actions:
            await self.execute(actions)
        return actions

    async def run(self, stop: asyncio.Event, is_active: Callable[[], bool] = lambda: True) -> None:
        """Plan and execute every ``interval_s`` until ``stop`` is set (while ``is_active()``, e.g. while
        this router replica holds the paging lease)."""
        while not stop.is_set():
            if is_active():
                try:
                    await self.step()
                except Exception:  # keep paging alive whatever one round did
                    log.exception("adapter paging round failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_s)
