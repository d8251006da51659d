"""The engine/router registry: one detached named Ray actor that engine replicas write to and routers poll.

Engine replicas register ``(pool, model, GPU class, address, capacity)`` when their endpoint is up,
refresh it every few seconds (a heartbeat) and deregister on shutdown. A replica that dies without
deregistering (``ray.kill``, node loss) simply stops refreshing; its record expires after its TTL. The
router's own StreamEvents subscription to each engine is the fast failure signal; the registry TTL is
the backstop that bounds how long a dead replica stays listed.

Router replicas publish their gRPC/HTTP addresses here too (so ``corral serve`` and tests find routers
that opened ephemeral ports), and take a lease for singleton duties (the adapter paging loop) so that
active-active routers do not fight over adapter placement.

:class:`Registry` is plain Python (unit-tested without Ray); :func:`get_registry` wraps it as the
detached actor ``corral-registry`` in a Ray namespace. :class:`RayRegistryDiscovery` is the router's
``Discovery`` over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.router.engine_client import Discovery

log = logging.getLogger(__name__)

REGISTRY_ACTOR_NAME = "corral-registry"


@dataclass(slots=True)
class _Entry:
    record: dict[str, Any]
    expires: float


class Registry:
    """Membership of engines and routers per pool, with TTLs, plus named leases. Not thread-safe: as a
    Ray actor it runs one call at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._engines: dict[str, dict[str, _Entry]] = {}
        self._routers: dict[str, dict[str, _Entry]] = {}
        self._demand: dict[str, dict[str, _Entry]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._version: dict[str, int] = {}

    # -- engines --
    def register_engine(self, pool_id: str, replica_id: str, record: dict[str, Any], ttl_s: float) -> int:
        """Insert or refresh an engine record; returns the pool's membership version."""
        pool = self._engines.setdefault(pool_id, {})
        old = pool.get(replica_id)
        pool[replica_id] = _Entry(dict(record, replica_id=replica_id), self._clock() + ttl_s)
        if old is None or old.record != pool[replica_id].record:
            self._bump(pool_id)
        return self._version.get(pool_id, 0)

    def deregister_engine(self, pool_id: str, replica_id: str) -> bool:
        if self._engines.get(pool_id, {}).pop(replica_id, None) is not None:
            self._bump(pool_id)
            return True
        return False

    def list_engines(self, pool_id: str) -> tuple[int, list[dict[str, Any]]]:
        """(membership version, live engine records sorted by replica id)."""
        self._expire(self._engines, pool_id)
        entries = self._engines.get(pool_id, {})
        return self._version.get(pool_id, 0), [entries[k].record for k in sorted(entries)]

    # -- routers --
    def register_router(self, pool_id: str, router_id: str, record: dict[str, Any], ttl_s: float) -> None:
        self._routers.setdefault(pool_id, {})[router_id] = _Entry(
            dict(record, router_id=router_id), self._clock() + ttl_s
        )

    def deregister_router(self, pool_id: str, router_id: str) -> None:
        self._routers.get(pool_id, {}).pop(router_id, None)

    def list_routers(self, pool_id: str) -> list[dict[str, Any]]:
        self._expire(self._routers, pool_id)
        entries = self._routers.get(pool_id, {})
        return [entries[k].record for k in sorted(entries)]

    # -- adapter demand (active-active routers each see a share) --
    def report_demand(self, pool_id: str, router_id: str, rates: dict[str, float], ttl_s: float) -> None:
        self._demand.setdefault(pool_id, {})[router_id] = _Entry(dict(rates), self._clock() + ttl_s)

    def demand(self, pool_id: str, exclude: str | None = None) -> dict[str, float]:
        """Sum of the live reports of ``pool_id``'s routers (except ``exclude``), adapter -> req/s."""
        self._expire(self._demand, pool_id)
        out: dict[str, float] = {}
        for rid, e in self._demand.get(pool_id, {}).items():
            if rid == exclude:
                continue
            for a, r in e.record.items():
                out[a] = out.get(a, 0.0) + float(r)
        return out

    # -- leases --
    def acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        """Take or renew ``key`` for ``holder`` unless another holder's lease is still valid."""
        now = self._clock()
        cur = self._leases.get(key)
        if cur is None or cur[0] == holder or cur[1] <= now:
            self._leases[key] = (holder, now + ttl_s)
            return True
        return False

    def release_lease(self, key: str, holder: str) -> None:
        cur = self._leases.get(key)
        if cur is not None and cur[0] == holder:
            del self._leases[key]

    def lease_holder(self, key: str) -> str | None:
        cur = self._leases.get(key)
        return cur[0] if cur is not None and cur[1] > self._clock() else None

    def ping(self) -> bool:
        return True

    # -- internals --
    def _bump(self, pool_id: str) -> None:
        self._version[pool_id] = self._version.get(pool_id, 0) + 1

    def _expire(self, table: dict[str, dict[str, _Entry]], pool_id: str) -> None:
        now = self._clock()
        pool = table.get(pool_id, {})
        dead = [k for k, e in pool.items() if e.expires <= now]
        for k in dead:
            del pool[k]
        if dead and table is self._engines:
            log.info("registry: %s expired from pool %s", ", ".join(dead), pool_id)
            self._bump(pool_id)


def get_registry(namespace: str, create: bool = True) -> Any:
    """The detached registry actor of ``namespace`` (created on first use when ``create``)."""
    import ray

    if not create:
        return ray.get_actor(REGISTRY_ACTOR_NAME, namespace=namespace)
    actor_cls = ray.remote(Registry)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=REGISTRY_ACTOR_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
    ).remote()


async def aget_registry(namespace: str, create: bool = True, timeout_s: float = 60.0) -> Any:
    """:func:`get_registry`, retried until the actor answers (replicas may start before it is placed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            handle = get_registry(namespace, create=create)
            await handle.ping.remote()
            return handle
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class RegistryHeartbeat:
    """Keeps one record registered (engine or router) until stopped, then deregisters it."""

    def __init__(
        self,
        namespace: str,
        pool_id: str,
        member_id: str,
        record: dict[str, Any],
        kind: str = "engine",
        period_s: float = 2.0,
    ) -> None:
        self.namespace, self.pool_id, self.member_id = namespace, pool_id, member_id
        self.record, self.kind, self.period_s = record, kind, period_s
        self._task: asyncio.Task[None] | None = None
        self._handle: Any = None

    async def _put(self) -> None:
        ttl = 3 * self.period_s
        if self.kind == "engine":
            await self._handle.register_engine.remote(self.pool_id, self.member_id, self.record, ttl)
        else:
            await self._handle.register_router.remote(self.pool_id, self.member_id, self.record, ttl)

    async def start(self) -> None:
        self._handle = await aget_registry(self.namespace)
        await self._put()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self._put()
            except Exception as e:  # registry restarting: retry next period
                log.warning("registry heartbeat for %s failed: %s", self.member_id, e)
                with contextlib.suppress(Exception):
                    self._handle = get_registry(self.namespace)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._handle is not None:
            with contextlib.suppress(Exception):
                if self.kind == "engine":
                    await asyncio.wait_for(
                        self._handle.deregister_engine.remote(self.pool_id, self.member_id), 5
                    )
                else:
                    await asyncio.wait_for(
                        self._handle.deregister_router.remote(self.pool_id, self.member_id), 5
                    )


class RayRegistryDiscovery(Discovery):
    """The router's ``Discovery`` over the registry actor: the live engine addresses of one pool."""

    def __init__(self, pool_id: str, namespace: str, poll_interval_s: float = 0.5) -> None:
        self.pool_id = pool_id
        self.namespace = namespace
        self.poll_interval_s = poll_interval_s
        self._handle: Any = None
        self.records: list[dict[str, Any]] = []
        self.version = -1

    async def endpoints(self) -> list[str]:
        try:
            if self._handle is None:
                self._handle = await aget_registry(self.namespace, timeout_s=10)
            self.version, self.records = await self._handle.list_engines.remote(self.pool_id)
        except Exception as e:  # keep the last known list while the registry is unreachable
            log.warning("registry discovery for %s failed: %s", self.pool_id, e)
            self._handle = None
        return [r["address"] for r in self.records if r.get("address")]
