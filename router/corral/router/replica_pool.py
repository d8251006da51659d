"""What every replica pool of a router shares, whatever the wire to its replicas.

A router keeps its :class:`~corral.router.state.FleetState` in sync with the replicas it can send to
through a pool: :class:`~corral.router.engine_client.EnginePool` (Corral engines, gRPC event streams) or
:class:`~corral.router.backends.pool.BackendPool` (OpenAI-compatible HTTP servers, probes and scrapes). This
module owns the part of the pool interface the router uses that does not depend on the wire: discovery
polling, the replica id -> connection map, quarantine after a failed request, waiting for replicas, and the
adapter catalog built from what the replicas report.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from .engine_client import Discovery
    from .state import FleetState


class ReplicaConn(Protocol):
    """The fields of one replica's connection the shared pool logic reads."""

    info: Any  # EngineInfo once known (``.model``), else None
    connected: bool
    adapters: dict[str, str]  # name -> tier
    sources: dict[str, str]  # name -> source uri
    quarantined_until: float


C = TypeVar("C", bound=ReplicaConn)


class ReplicaPool(Generic[C]):
    """Base of the router's replica pools; subclasses fill ``by_replica`` and implement ``refresh``."""

    fleet: FleetState
    discovery: Discovery
    by_replica: dict[str, C]  # replica id -> connection (admitted replicas)
    _changed: asyncio.Condition  # notified whenever membership or health changes

    async def refresh(self) -> None:
        raise NotImplementedError

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.discovery.poll_interval_s)
            await self.refresh()

    def conn_for(self, replica_id: str) -> C | None:
        return self.by_replica.get(replica_id)

    def quarantine(self, replica_id: str, seconds: float) -> None:
        """Take a replica out of routing for ``seconds`` (a request to it failed); it comes back after that
        if it is still connected."""
        c = self.by_replica.get(replica_id)
        if c is None:
            return
        c.quarantined_until = time.monotonic() + seconds
        self.fleet.set_healthy(replica_id, False)
        asyncio.get_running_loop().call_later(seconds, self._unquarantine, c, replica_id)

    def _unquarantine(self, c: C, replica_id: str) -> None:
        if self.by_replica.get(replica_id) is c and c.connected:
            self.fleet.set_healthy(replica_id, True)

    async def wait_for_replicas(self, n: int, timeout: float = 10.0, model: str | None = None) -> None:
        """Wait until at least ``n`` replicas (of ``model``) are routable."""

        def ready() -> bool:
            if model is None:
                return sum(r.healthy for r in self.fleet.replicas.values()) >= n
            return len(self.fleet.candidates(model)) >= n

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(ready)

    def adapter_catalog(self) -> dict[str, tuple[str, str]]:
        """Adapters known by any admitted replica: name -> (base model, source uri; a known source wins)."""
        out: dict[str, tuple[str, str]] = {}
        for c in self.by_replica.values():
            if c.info is None:
                continue
            for name in c.adapters:
                src = c.sources.get(name, "")
                if name not in out or (src and not out[name][1]):
                    out[name] = (c.info.model, src)
        return out
