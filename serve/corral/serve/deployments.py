"""The Ray Serve deployments: engine replicas and router replicas. Serve places, health-checks and restarts
them; tokens never pass through Serve.

:class:`EngineDeployment` builds one engine (the simulator in wall-clock mode, or vLLM), serves it with the
gRPC :class:`~corral.serve.endpoint.EngineEndpoint` on the node's IP (ephemeral port), and keeps a record
``(pool, model, GPU class, address, capacity)`` in the registry actor while it lives; ``check_health``
fails when the endpoint or the engine does, so Serve replaces the replica.

:class:`RouterDeployment` runs a :class:`~corral.router.server.RouterServer` that opens its own gRPC and
HTTP ports (fixed from the options, or ephemeral), discovers engines through the registry
(:class:`~corral.serve.registry.RayRegistryDiscovery`), publishes its own addresses there, and applies the
RoutingPolicy from ``user_config`` live (``reconfigure`` -> ``update_policy``; engines untouched). Each
router replica rebuilds its state from the engines' event streams, so several run active-active; the one
holding the registry's paging lease also runs the adapter paging loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from corral.router.paging import AdapterInfo, AdapterPager, PagingConfig
from ray import serve

from .app import DEFAULT_NAMESPACE
from .registry import RayRegistryDiscovery, RegistryHeartbeat, aget_registry

log = logging.getLogger(__name__)


def _node_ip() -> str:
    import ray

    try:
        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _replica_tag() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return f"p{os.getpid()}"


async def make_engine(
    engine: str,
    *,
    replica_id: str,
    model: str,
    base_model: str,
    gpu_class: str,
    profile: str,
    block_size: int,
    max_loras: int,
    max_cpu_loras: int,
    max_model_len: int,
    engine_args: dict[str, Any],
    sim_time_scale: float = 1.0,
    profile_overrides: dict[str, Any] | None = None,
) -> Any:
    """Build the engine a replica serves (an object satisfying ``corral.serve.endpoint.Engine``)."""
    if engine == "vllm":
        from .vllm_engine import VllmEngine

        return await VllmEngine.create(
            replica_id=replica_id,
            model=model,
            base_model=base_model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len,
            engine_args=engine_args,
        )
    if engine == "echo":  # zero-cost engine (benchmarks, smoke tests)
        from .endpoint import EchoEngine

        return EchoEngine(
            replica_id=replica_id,
            model=model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            max_loras=max_loras,
            max_model_len=max_model_len,
        )
    if engine == "sim":
        from corral.api.profiles import resolve_profile

        from .endpoint.sim import SimEndpointEngine

        prof = resolve_profile(profile, profile_overrides or None)
        return SimEndpointEngine.create(
            prof,  # type: ignore[arg-type]  # SimEngine takes a GpuProfile or a name
            replica_id,
            model,
            time_scale=sim_time_scale,
            block_size=block_size,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            gpu_class=gpu_class,
            max_model_len=max_model_len,
        )
    raise ValueError(f"unknown engine {engine!r}")


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=10,
)
class EngineDeployment:
    """One engine replica: engine + gRPC endpoint + registry record."""

    async def __init__(  # type: ignore[misc]
        self,
        *,
        pool_id: str,
        model: str,
        base_model: str,
        engine: str,
        engine_args: dict[str, Any],
        max_model_len: int,
        gpu_class: str,
        profile: str,
        profile_overrides: dict[str, Any] | None = None,
        gpus_per_replica: float = 1,
        block_size: int = 16,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        namespace: str = DEFAULT_NAMESPACE,
        sim_time_scale: float = 1.0,
        heartbeat_s: float = 2.0,
        advertise_host: str | None = None,
    ) -> None:
        from .endpoint import EngineEndpoint

        self.pool_id = pool_id
        self.replica_id = f"{model}-{gpu_class}-{_replica_tag()}"
        self.adapters: list[dict[str, Any]] = []
        self.engine = await make_engine(
            engine,
            replica_id=self.replica_id,
            model=model,
            base_model=base_model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len,
            engine_args=engine_args,
            sim_time_scale=sim_time_scale,
            profile_overrides=profile_overrides,
        )
        host = advertise_host or _node_ip()
        self.endpoint = await EngineEndpoint.start(self.engine, host, 0)
        self.address = self.endpoint.address
        info = self.engine.info
        self.record = {
            "model": model,
            "gpu_class": gpu_class,
            "profile": profile,
            "engine": engine,
            "address": self.address,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "capacity": {
                "gpus": gpus_per_replica,
                "max_loras": max_loras,
                "max_cpu_loras": max_cpu_loras,
                "kv_capacity_blocks": getattr(info, "kv_capacity_blocks", 0),
                "max_model_len": max_model_len,
            },
            "started": time.time(),
        }
        self.heartbeat = RegistryHeartbeat(
            namespace, pool_id, self.replica_id, self.record, "engine", heartbeat_s
        )
        await self.heartbeat.start()
        self._closed = False
        log.info("engine replica %s (%s) serving on %s", self.replica_id, engine, self.address)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Adapter catalog changes (informational: routers send each request's adapter source)."""
        self.adapters = list((user_config or {}).get("adapters") or [])

    async def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("engine replica is shutting down")
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            res = check()
            if asyncio.iscoroutine(res):
                await res
        if getattr(self.engine, "healthy", True) is False:
            raise RuntimeError(f"engine {self.replica_id} reports unhealthy")

    def info(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, **self.record}

    def __call__(self, *_: Any) -> dict[str, Any]:
        return self.info()

    async def __del__(self) -> None:
        self._closed = True
        if (hb := getattr(self, "heartbeat", None)) is not None:
            with contextlib.suppress(Exception):
                await hb.stop()
        if (ep := getattr(self, "endpoint", None)) is not None:
            with contextlib.suppress(Exception):
                await ep.stop(1.0)
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                res = close()
                if asyncio.iscoroutine(res):
                    await res


# ---- router -----------------------------------------------------------------------------------------


def policy_from_spec(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """RoutingPolicy spec -> (policy name, params).

    The spec's generic knobs map onto the params of policies that take them (each checked by building
    the policy with that one param, so a baseline without an SLO simply ignores ``ttftSloMs``):
    ``ttftSloMs`` -> ``ttft_slo_s``, ``load.hotspotFactor`` -> ``hotspot_c``, ``load.twoChoiceAbove`` ->
    ``narrow_above``. Explicit ``params`` (if the spec carries any) win.
    """
    from corral.router.policy import make_policy

    strategy = str(spec.get("strategy") or "corral")
    explicit = dict(spec.get("params") or spec.get("strategyParams") or {})
    load = spec.get("load") or {}
    candidates: dict[str, Any] = {}
    if (v := spec.get("ttftSloMs")) is not None:
        candidates["ttft_slo_s"] = float(v) / 1000.0
    if (v := load.get("hotspotFactor")) is not None:
        candidates["hotspot_c"] = float(v)
    if (v := load.get("twoChoiceAbove")) is not None:
        candidates["narrow_above"] = int(v)
    params: dict[str, Any] = {}
    for k, v in candidates.items():
        if k in explicit:
            continue
        try:
            make_policy(strategy, **{k: v})
        except (ValueError, TypeError):
            continue
        params[k] = v
    params.update(explicit)
    make_policy(strategy, **params)  # fail here, in reconfigure, on a bad explicit param
    return strategy, params


class GrpcAdapterControl:
    """:class:`~corral.router.paging.AdapterControl` over the engines' ``LoadAdapter``/``UnloadAdapter``."""

    def __init__(self, pool: Any, timeout_s: float = 60.0) -> None:
        self.pool = pool  # corral.router.engine_client.EnginePool
        self.timeout_s = timeout_s

    async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: str) -> None:
        from corral.v1 import engine_pb2 as epb

        conn = self.pool.conn_for(replica_id)
        if conn is None:
            raise LookupError(f"no connection to {replica_id}")
        await conn.stub.LoadAdapter(
            epb.LoadAdapterRequest(name=adapter, source_uri=source, tier=tier), timeout=self.timeout_s
        )

    async def unload_adapter(self, replica_id: str, adapter: str) -> None:
        from corral.v1 import engine_pb2 as epb

        conn = self.pool.conn_for(replica_id)
        if conn is None:
            raise LookupError(f"no connection to {replica_id}")
        await conn.stub.UnloadAdapter(
            epb.UnloadAdapterRequest(name=adapter, tier="gpu"), timeout=self.timeout_s
        )


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=10,
)
class RouterDeployment:
    """One router replica: the RouterServer on its own ports (Prometheus metrics at ``/metrics`` on the HTTP
    port), registry discovery, live policy, paging."""

    async def __init__(  # type: ignore[misc]
        self,
        *,
        engines: list[Any] | None = None,  # engine deployment handles (bound so Serve deploys them)
        pool_id: str,
        namespace: str = DEFAULT_NAMESPACE,
        host: str = "0.0.0.0",
        grpc_port: int = 0,
        http_port: int = 0,
        models: list[dict[str, Any]] | None = None,
        advertise_host: str | None = None,
    ) -> None:
        from corral.router.server import RouterConfig, RouterServer

        self.pool_id, self.namespace = pool_id, namespace
        self.models = list(models or [])
        self.router_id = f"router-{_replica_tag()}"
        self.discovery = RayRegistryDiscovery(pool_id, namespace, poll_interval_s=0.5)
        self.server = RouterServer(self.discovery, RouterConfig(router_id=self.router_id))
        await self.server.start(host=host, grpc_port=grpc_port, http_port=http_port)
        adv = advertise_host or ("127.0.0.1" if host in ("127.0.0.1", "localhost") else _node_ip())
        self.grpc_address = self.server.grpc_address.replace("0.0.0.0", adv)
        self.http_url = self.server.http_url.replace("0.0.0.0", adv)
        self.policy: tuple[str, dict[str, Any]] = ("corral", {})
        self.pager = AdapterPager(self.server.fleet, GrpcAdapterControl(self.server.router.pool), [])
        self._hook_dispatch()
        self.record = {
            "grpc": self.grpc_address,
            "http": self.http_url,
            "pid": os.getpid(),
            "started": time.time(),
        }
        self.heartbeat = RegistryHeartbeat(namespace, pool_id, self.router_id, self.record, "router", 2.0)
        await self.heartbeat.start()
        self._lease_key = f"paging/{pool_id}"
        self._leader = False
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="corral-paging-lease"),
            asyncio.create_task(self.pager.run(self._stop, lambda: self._leader), name="corral-paging"),
        ]
        log.info("router %s: gRPC %s, HTTP %s", self.router_id, self.grpc_address, self.http_url)

    def _hook_dispatch(self) -> None:
        """Feed the pager's demand tracker from the router's dispatch accounting."""
        fleet = self.server.fleet
        original = fleet.on_dispatch
        pager = self.pager

        def on_dispatch(replica_id: str, req: Any, cached_blocks: int | None = None) -> None:
            pager.on_dispatch(req.adapter)
            original(replica_id, req, cached_blocks)

        fleet.on_dispatch = on_dispatch

    async def _lease_loop(self) -> None:
        """Hold (or wait for) the pool's paging lease, and share this router's adapter demand: each
        router dispatches only its share, so the leader plans from the pool-wide sum."""
        ttl = 5.0
        while not self._stop.is_set():
            try:
                reg = await aget_registry(self.namespace, timeout_s=10)
                self._leader = bool(await reg.acquire_lease.remote(self._lease_key, self.router_id, ttl))
                now = self.pager.clock()
                await reg.report_demand.remote(
                    self.pool_id, self.router_id, self.pager.demand.rates(now), ttl
                )
                if self._leader:
                    self.pager.set_external_demand(await reg.demand.remote(self.pool_id, self.router_id))
            except Exception as e:
                log.warning("paging lease: %s", e)
                self._leader = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a RoutingPolicy (and the pool's adapter catalog) live."""
        cfg = user_config or {}
        spec = dict(cfg.get("policy") or {})
        strategy, params = policy_from_spec(spec)
        if (strategy, params) != self.policy:
            self.server.update_policy(strategy, params)
            self.policy = (strategy, params)
        adapters = [
            AdapterInfo(a["name"], a.get("baseModel") or "", a.get("source") or "")
            for a in cfg.get("adapters") or []
        ]
        self.server.router.config.adapters = {a.name: (a.base_model, a.source) for a in adapters}
        paging = spec.get("adapterPaging") or {}
        self.pager.update(
            adapters, PagingConfig.from_specs(_Attrs(paging), _Attrs(cfg.get("adapterCache") or {}))
        )

    def addresses(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "grpc": self.grpc_address,
            "http": self.http_url,
            "pid": os.getpid(),
            "policy": self.policy[0],
            "models": self.models,
            "paging_leader": self._leader,
            "replicas": sorted(self.server.fleet.replicas),
        }

    def fleet_view(self) -> dict[str, Any]:
        """This router's view of each engine replica (tests, ``corral`` tooling)."""
        return {
            rid: {
                "model": r.model,
                "gpu_class": r.gpu_class,
                "healthy": r.healthy,
                "address": r.address,
                "adapters_gpu": sorted(r.adapters_gpu),
                "adapters_cpu": sorted(r.adapters_cpu),
                "dispatched": r.dispatched_total,
            }
            for rid, r in self.server.fleet.replicas.items()
        }

    def paging_stats(self) -> dict[str, Any]:
        s = self.pager.stats
        return {"loads": s.loads, "unloads": s.unloads, "prefetches": s.prefetches, "failures": s.failures,
                "targets": dict(s.last_targets), "leader": self._leader}  # fmt: skip

    def __call__(self, *_: Any) -> dict[str, Any]:
        return self.addresses()

    async def check_health(self) -> None:
        if self._stop.is_set():
            raise RuntimeError("router replica is shutting down")

    async def __del__(self) -> None:
        if not hasattr(self, "_stop"):
            return  # __init__ did not finish
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            reg = await aget_registry(self.namespace, create=False, timeout_s=2)
            await reg.release_lease.remote(self._lease_key, self.router_id)
        with contextlib.suppress(Exception):
            await self.heartbeat.stop()
        with contextlib.suppress(Exception):
            await self.server.stop(0.5)


class _Attrs:
    """Attribute view of a camelCase dict (for :meth:`PagingConfig.from_specs`)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
