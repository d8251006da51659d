"""Router side of the engine wire: discovery of engine endpoints, one event subscription per engine
feeding :class:`~corral.router.state.FleetState`, and the channels requests are streamed over.

Routers are gRPC clients; engine replicas are servers. A :class:`Discovery` source says which engine
addresses exist (:class:`StaticDiscovery` for local runs and tests; the Ray deployment plugs in a
named-actor registry). For every address, :class:`EnginePool` keeps a ``StreamEvents`` subscription: the
snapshot adds the replica to the fleet (profile, KV capacity, adapters, resident blocks), deltas update
it, and the replica is removed when the stream breaks or is silent for ``stale_after_s`` (the engine sends
a load sample every sample period, so silence means it stopped answering). It then reconnects with
backoff for as long as discovery lists the address. Nothing is shared between routers: each one
rebuilds its own state from the engines' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from corral.v1 import engine_pb2 as epb

from .engine_mux import MuxEngineStub
from .events import AdapterLoaded, AdapterUnloaded, AllBlocksCleared, BlockRemoved, BlockStored, EngineEvent
from .replica_pool import ReplicaPool
from .state import FleetState
from .tls import ClientTls, secure_channel
from .wire import EngineInfo, event_from_pb

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# ---- discovery ------------------------------------------------------------------------------------------
class Discovery(ABC):
    """Where a router learns engine endpoint addresses. Polled every ``poll_interval_s``.

    Implementations: :class:`StaticDiscovery`; the Ray deployment's named-actor registry (engines write
    their address on start, routers poll ``endpoints()``).
    """

    poll_interval_s: float = 1.0

    @abstractmethod
    async def endpoints(self) -> Sequence[str]:
        """Current engine addresses (``host:port``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (optional)."""


class StaticDiscovery(Discovery):
    """A fixed (or hand-edited, in tests) list of engine addresses."""

    def __init__(self, addresses: Iterable[str] = (), poll_interval_s: float = 0.5) -> None:
        self.addresses: list[str] = [a for a in addresses if a]
        self.poll_interval_s = poll_interval_s

    async def endpoints(self) -> Sequence[str]:
        return list(self.addresses)

    def add(self, address: str) -> None:
        if address not in self.addresses:
            self.addresses.append(address)

    def remove(self, address: str) -> None:
        if address in self.addresses:
            self.addresses.remove(address)


# ---- per-engine connection --------------------------------------------------------------------------------
@dataclass(eq=False)
class EngineConn:
    """One engine endpoint as seen by this router."""

    address: str
    channel: grpc.aio.Channel
    stub: MuxEngineStub
    info: EngineInfo | None = None
    replica_id: str | None = None
    last_msg: float = 0.0
    adapters: dict[str, str] = field(default_factory=dict)  # name -> tier (gpu/cpu/disk)
    sources: dict[str, str] = field(default_factory=dict)  # name -> source uri
    connected: bool = False
    task: asyncio.Task[None] | None = None
    call: Any = None
    quarantined_until: float = 0.0


def _default_profile(name: str) -> Any:
    from corral.api.profiles import resolve_profile

    return resolve_profile(name)


class EnginePool(ReplicaPool[EngineConn]):
    """Keeps this router's :class:`FleetState` in sync with the engines that discovery reports."""

    def __init__(
        self,
        fleet: FleetState,
        discovery: Discovery,
        *,
        router_id: str = "router",
        stale_after_s: float = 1.0,
        reconnect_backoff_s: float = 0.2,
        resolve_profile: Callable[[str], Any] = _default_profile,
        profiles: Mapping[str, Any] | None = None,
        on_event: Callable[[str, EngineEvent], None] | None = None,
        on_membership: Callable[[str, bool], None] | None = None,
        engine_tls: ClientTls | None = None,  # TLS (mTLS with a client cert) to the engines; None: plaintext
    ) -> None:
        self.engine_tls = engine_tls
        self.fleet = fleet
        self.discovery = discovery
        self.router_id = router_id
        self.stale_after_s = stale_after_s
        self.reconnect_backoff_s = reconnect_backoff_s
        self.resolve_profile = resolve_profile
        # GPU class -> resolved GpuProfile (the pool's profile with its profileOverrides), which wins over
        # the profile name an engine reports (RouterSettings.profiles; see set_profiles)
        self.profiles: dict[str, Any] = dict(profiles or {})
        self.on_event = on_event
        self.on_membership = on_membership
        self.conns: dict[str, EngineConn] = {}  # address -> conn
        self.by_replica: dict[str, EngineConn] = {}  # replica id -> conn
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="corral-discovery"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="corral-staleness"))

    async def stop(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for c in list(self.conns.values()):
            await self._drop(c)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.discovery.close()

    async def refresh(self) -> None:
        """Poll discovery once: connect new addresses, drop vanished ones."""
        try:
            addrs = set(await self.discovery.endpoints())
        except Exception as e:  # a flaky registry must not kill routing
            log.warning("discovery failed: %s", e)
            return
        for a in addrs - self.conns.keys():
            self._connect(a)
        for a in self.conns.keys() - addrs:
            await self._drop(self.conns[a])

    def _connect(self, address: str) -> None:
        ch = secure_channel(address, self.engine_tls, CHANNEL_OPTIONS)
        conn = EngineConn(address=address, channel=ch, stub=MuxEngineStub(ch))  # requests: one call, muxed
        self.conns[address] = conn
        conn.task = asyncio.create_task(self._run(conn), name=f"corral-events-{address}")

    async def _drop(self, conn: EngineConn) -> None:
        self.conns.pop(conn.address, None)
        if conn.task is not None:
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.task
        self._remove_replica(conn, "dropped by discovery")
        with contextlib.suppress(Exception):
            await conn.stub.aclose()
        with contextlib.suppress(Exception):
            await conn.channel.close()

    async def _watchdog(self) -> None:
        period = max(0.01, self.stale_after_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for c in list(self.conns.values()):
                if c.connected and now - c.last_msg > self.stale_after_s and c.call is not None:
                    log.warning(
                        "engine %s (%s) silent for %.2fs: removing", c.replica_id, c.address, now - c.last_msg
                    )
                    c.call.cancel()
                    # its requests would wait on it too: end them (queued ones are retried elsewhere)
                    aclose = getattr(c.stub, "aclose", None)
                    if aclose is not None:
                        why = (f"engine {c.replica_id} ({c.address}) ejected: no event or load sample for "
                               f"{now - c.last_msg:.2f}s (stale_after_s {self.stale_after_s})")  # fmt: skip
                        self._tasks = [t for t in self._tasks if not t.done()]
                        self._tasks.append(asyncio.create_task(aclose(why), name=f"corral-eject-{c.address}"))

    # ---- the event subscription ------------------------------------------------------------------------
    async def _run(self, conn: EngineConn) -> None:
        backoff = self.reconnect_backoff_s
        while not self._closed and self.conns.get(conn.address) is conn:
            call = conn.stub.StreamEvents(epb.Subscribe(subscriber=self.router_id))
            conn.call = call
            try:
                async for batch in call:
                    conn.last_msg = time.monotonic()
                    if batch.snapshot:
                        await self._on_snapshot(conn, batch)
                        backoff = self.reconnect_backoff_s
                    elif conn.replica_id is not None:
                        self._on_deltas(conn, batch)
            except asyncio.CancelledError:
                if self.conns.get(conn.address) is not conn or self._closed:
                    self._remove_replica(conn, "stopped")
                    raise
                # cancelled by the watchdog (the call was cancelled): fall through, reconnect
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    log.info("event stream from %s broke: %s", conn.address, e.code().name)
            except Exception:
                log.exception("event stream from %s failed", conn.address)
            finally:
                conn.call = None
                call.cancel()
            self._remove_replica(conn, "event stream ended")
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def _on_snapshot(self, conn: EngineConn, batch: epb.EngineEventBatch) -> None:
        info = EngineInfo.from_pb(batch.info)
        if not info.address:
            info.address = conn.address
        if conn.replica_id is not None:
            self._remove_replica(conn, "re-snapshot")
        old = self.by_replica.get(info.replica_id)
        if old is not None and old is not conn:
            self._remove_replica(old, f"replica id now served at {conn.address}")
        profile = self.profile_for(info)
        r = self.fleet.add_replica(
            info.replica_id,
            model=info.model,
            gpu_class=info.gpu_class,
            profile=profile,
            block_size=info.block_size,
            kv_capacity_blocks=info.kv_capacity_blocks or None,
            max_gpu_adapters=info.max_loras or 4,
            address=conn.address,
            max_cpu_adapters=info.max_cpu_loras or None,
        )
        r.index.insert(batch.resident_blocks)
        conn.adapters.clear()
        for a in batch.adapters:
            conn.adapters[a.name] = a.tier or "gpu"
            if a.source_uri:
                conn.sources[a.name] = a.source_uri
            if a.tier == "gpu":
                r.adapters_gpu.add(a.name)
            elif a.tier == "cpu":
                r.adapters_cpu.add(a.name)
        conn.info = info
        if self.engine_tls is None:  # the framed stream is plaintext: with TLS, requests stay on gRPC
            conn.stub.stream_address = info.stream_address or None
        conn.replica_id = info.replica_id
        conn.connected = True
        self.by_replica[info.replica_id] = conn
        log.info(
            "engine %s (%s, %s) joined from %s", info.replica_id, info.model, info.gpu_class, conn.address
        )
        if self.on_membership is not None:
            self.on_membership(info.replica_id, True)
        async with self._changed:
            self._changed.notify_all()

    def _on_deltas(self, conn: EngineConn, batch: epb.EngineEventBatch) -> None:
        rid = conn.replica_id
        assert rid is not None
        fleet = self.fleet
        r = fleet.replicas.get(rid)
        precise = fleet.index_mode == "precise"
        for m in batch.events:
            ev = event_from_pb(rid, m)
            if ev is None:
                continue
            if isinstance(ev, AdapterLoaded):
                conn.adapters[ev.adapter] = ev.tier
                src = m.adapter_loaded.source_uri
                if src:
                    conn.sources[ev.adapter] = src
            elif isinstance(ev, AdapterUnloaded):
                if ev.tier == "gpu":
                    conn.adapters[ev.adapter] = "cpu"
                else:
                    conn.adapters.pop(ev.adapter, None)
            fleet.apply(ev)
            # In approximate mode the index is fed by the router's own dispatches; engine block events
            # also apply, so every router converges on what the engines really hold (active-active).
            if not precise and r is not None:
                if isinstance(ev, BlockStored):
                    r.index.insert(ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    r.index.remove(ev.block_hashes)
                elif isinstance(ev, AllBlocksCleared):
                    r.index.clear()
            if self.on_event is not None:
                self.on_event(rid, ev)

    def _remove_replica(self, conn: EngineConn, why: str) -> None:
        rid = conn.replica_id
        conn.connected = False
        if rid is None:
            return
        conn.replica_id = None
        if self.by_replica.get(rid) is conn:
            del self.by_replica[rid]
            r = self.fleet.replicas.get(rid)
            if r is not None and r.address == conn.address:
                self.fleet.remove_replica(rid)
            log.info("engine %s (%s) left routing: %s", rid, conn.address, why)
            if self.on_membership is not None:
                self.on_membership(rid, False)

    # ---- profiles ----------------------------------------------------------------------------------------
    def profile_for(self, info: EngineInfo) -> Any:
        """The cost-model profile of a replica: its GPU class's profile from the pool (overrides applied),
        else the built-in profile the engine names."""
        p = self.profiles.get(info.gpu_class)
        return p if p is not None else self.resolve_profile(info.profile)

    def set_profiles(self, profiles: Mapping[str, Any]) -> None:
        """Replace the GPU-class profiles and re-resolve every connected replica's profile."""
        self.profiles = dict(profiles)
        changed = False
        for c in self.by_replica.values():
            r = self.fleet.replicas.get(c.replica_id or "")
            if c.info is None or r is None:
                continue
            p = self.profile_for(c.info)
            if p != r.profile:
                r.profile = p
                changed = True
        if changed:
            self.fleet.version += 1  # policies cache per-replica weights on the fleet version
