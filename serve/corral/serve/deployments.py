"""The Ray Serve deployments: engine replicas and router replicas. Serve places, health-checks and restarts
them; tokens never pass through Serve.

:class:`EngineDeployment` builds one engine (the simulator in wall-clock mode, or vLLM), serves it with the
gRPC :class:`~corral.serve.endpoint.EngineEndpoint` on the node's IP (ephemeral port), and keeps a record
``(pool, model, GPU class, address, capacity)`` in the registry actor while it lives; ``check_health``
fails when the endpoint or the engine does, so Serve replaces the replica.

:class:`RouterDeployment` runs a :class:`~corral.router.server.RouterServer` that opens its own gRPC and
HTTP ports (fixed from the options, or ephemeral), discovers engines through the registry
(:class:`~corral.serve.registry.RayRegistryDiscovery`), publishes its own addresses there, and applies the
RoutingPolicy from ``user_config`` live (``reconfigure`` -> ``Router.configure``; engines untouched). Each
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


def _node_id() -> str:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


SIM_ENGINE_ARGS = frozenset({"enable_prefix_caching", "max_num_batched_tokens", "max_num_seqs"})
"""ModelPool ``engineArgs`` (vLLM names) that the simulator applies too; it logs and ignores the others."""


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
    max_model_len: int | None,
    engine_args: dict[str, Any],
    sim_time_scale: float = 1.0,
    profile_overrides: dict[str, Any] | None = None,
    kv_offload_gib: float = 0.0,
    kv_offload_backend: str = "native",
) -> Any:
    """Build the engine a replica serves (an object satisfying ``corral.serve.endpoint.Engine``).

    ``max_model_len`` None (the ModelPool's ``maxModelLen`` unset) is not passed on: each engine keeps its
    own default (vLLM: the model's context length; the simulator and the echo engine: theirs), and the
    replica reports the limit it runs with (``EngineInfo.max_model_len``)."""
    limit: dict[str, Any] = {} if max_model_len is None else {"max_model_len": int(max_model_len)}
    if engine == "vllm" and kv_offload_gib > 0:  # ModelPool kvOffload, unless engineArgs say otherwise
        engine_args = {
            "kv_offloading_size": kv_offload_gib,
            "kv_offloading_backend": kv_offload_backend,
            **engine_args,
        }
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
            engine_args=engine_args,
            **limit,
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
            **limit,
        )
    if engine == "sim":
        from corral.api.profiles import resolve_profile

        from .endpoint.sim import SimEndpointEngine

        sim_kw = {k: v for k, v in engine_args.items() if k in SIM_ENGINE_ARGS}
        if ignored := sorted(set(engine_args) - set(sim_kw)):
            log.info("model %s: the simulator has no use for engineArgs %s (vLLM settings)", model, ignored)
        prof = resolve_profile(profile, profile_overrides or None)
        if kv_offload_gib > 0:  # the simulator's CPU KV tier (corral.serve.sim.kv_offload), same size
            sim_kw["cpu_kv_tokens"] = int(kv_offload_gib * 2**30) // prof.kv_bytes_per_token
        return SimEndpointEngine.create(
            prof,  # type: ignore[arg-type]  # SimEngine takes a GpuProfile or a name
            replica_id,
            model,
            time_scale=sim_time_scale,
            block_size=block_size,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            gpu_class=gpu_class,
            **limit,
            **sim_kw,
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
        max_model_len: int | None,
        gpu_class: str,
        profile: str,
        profile_overrides: dict[str, Any] | None = None,
        gpus_per_replica: float = 1,
        block_size: int = 16,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        kv_offload_gib: float = 0.0,
        kv_offload_backend: str = "native",
        namespace: str = DEFAULT_NAMESPACE,
        sim_time_scale: float = 1.0,
        heartbeat_s: float = 2.0,
        advertise_host: str | None = None,
        tls_dir: str | None = None,  # ServeOptions.engine_tls_dir: serve mutual TLS only
    ) -> None:
        from corral.router.tls import ServerTls

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
            kv_offload_gib=kv_offload_gib,
            kv_offload_backend=kv_offload_backend,
        )
        host = advertise_host or _node_ip()
        tls = ServerTls.from_dir(tls_dir, mtls=True) if tls_dir else None
        self.endpoint = await EngineEndpoint.start(self.engine, host, 0, tls=tls)
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
            "node_id": _node_id(),
            "capacity": {
                "gpus": gpus_per_replica,
                "max_loras": max_loras,
                "max_cpu_loras": max_cpu_loras,
                "kv_capacity_blocks": getattr(info, "kv_capacity_blocks", 0),
                "max_model_len": getattr(info, "max_model_len", max_model_len),  # what the engine runs with
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


_WILDCARD_HOSTS = ("0.0.0.0", "", "::", "[::]")


def advertised_host(bind_host: str, advertise_host: str | None = None) -> str:
    """The host other processes reach a listener bound to ``bind_host`` at: ``advertise_host`` if set,
    the bind address itself if it is a specific one, else (a wildcard bind) this node's IP."""
    if advertise_host:
        return advertise_host
    if bind_host not in _WILDCARD_HOSTS:
        return bind_host
    return _node_ip()


def _with_host(address: str, host: str) -> str:
    """``127.0.0.1:1234`` / ``http://127.0.0.1:1234`` -> the same port on ``host``."""
    scheme, sep, rest = address.rpartition("://")
    port = rest.rsplit(":", 1)[1]
    return f"{scheme}{sep}{host}:{port}"


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=5,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=10,
)
class RouterDeployment:
    """One router replica: the RouterServer on its own ports (Prometheus metrics at ``/metrics`` on the HTTP
    port), registry discovery, live RoutingPolicy, paging.

    Its settings are :func:`corral.router.settings.router_settings` of the ModelPool and the RoutingPolicy
    spec, both in ``user_config`` (live: adapter and policy changes never restart a replica). Serve calls
    :meth:`reconfigure` right after the constructor; the first call starts the server with those settings
    (so the prefix-index mode, queue bound, tenants and profiles are right from the first request), later
    ones apply changes in place."""

    async def __init__(  # type: ignore[misc]
        self,
        *,
        engines: list[Any] | None = None,  # engine deployment handles (bound so Serve deploys them)
        pool_id: str,
        pool: dict[str, Any] | None = None,  # the ModelPool (camelCase CR); user_config["pool"] wins
        namespace: str = DEFAULT_NAMESPACE,
        host: str = "0.0.0.0",
        grpc_port: int = 0,
        http_port: int = 0,
        models: list[dict[str, Any]] | None = None,
        advertise_host: str | None = None,
        api_keys_file: str | None = None,
        tls: dict[str, Any] | None = None,  # ServeOptions' router_tls_dir, client_auth, engine TLS
        selection_state_dir: str | None = None,  # ServeOptions.selection_state_dir: bandit state folder
    ) -> None:
        from corral.api.modelpool import ModelPool

        self.pool_id, self.namespace = pool_id, namespace
        self.pool = ModelPool.model_validate(pool) if pool else None
        self.models = list(models or [])
        self.router_id = f"router-{_replica_tag()}"
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.advertise_host = advertise_host
        self.api_keys_file = api_keys_file
        self.tls = dict(tls or {})
        self.selection_state_dir = selection_state_dir
        self.api_keys: Any = None  # corral.router.server.auth.KeyStore: reloads the file when it changes
        if api_keys_file:
            from corral.router.server import load_api_keys

            self.api_keys = load_api_keys(api_keys_file)
        self.server: Any = None
        self.settings: Any = None  # corral.router.settings.RouterSettings
        self.policy: tuple[str, dict[str, Any]] = ("", {})
        self.grpc_address = self.http_url = ""
        self.heartbeat: RegistryHeartbeat | None = None
        self._lease_key = f"paging/{pool_id}"
        self._leader = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    # ---- settings -----------------------------------------------------------------------------------------
    def settings_for(self, user_config: dict[str, Any] | None) -> Any:
        """RouterSettings of this pool under the RoutingPolicy spec in ``user_config`` (defaults if none).
        Raises (and so fails the reconfigure) on an invalid spec, or on tenants without API keys."""
        from corral.api.modelpool import ModelPool
        from corral.api.routingpolicy import RoutingPolicySpec
        from corral.router.settings import default_policy_spec, router_settings

        cfg = user_config or {}
        if cfg.get("pool"):  # the whole ModelPool travels in user_config: adapter changes apply live
            self.pool = ModelPool.model_validate(cfg["pool"])
        raw = cfg.get("policy")
        pool_name = self.pool.metadata.name if self.pool is not None else self.pool_id
        spec = RoutingPolicySpec.model_validate(raw) if raw else default_policy_spec(pool_name)
        settings = router_settings(spec, self.pool)
        if settings.tenant_secret is not None and self.api_keys is None:
            raise ValueError(
                f"pool {self.pool_id}: the RoutingPolicy sets spec.tenants but this router has no API keys "
                "(ServeOptions.api_keys_file): refusing to serve open"
            )
        return settings

    async def _tokenizers(self, settings: Any) -> dict[str, Any]:
        """The ModelPool's tokenizers (``models[].tokenizer``), loaded off the event loop."""
        from corral.router.tokenizer import load_tokenizer_cached

        out = {}
        for m in settings.models.values():
            if m.tokenizer:
                out[m.name] = await asyncio.to_thread(load_tokenizer_cached, m.tokenizer)
        return out

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a RoutingPolicy live (the first call starts the server with it)."""
        settings = self.settings_for(user_config)
        tokenizers = await self._tokenizers(settings)
        async with self._lock:
            if self.server is None:
                await self._start(settings, tokenizers)
            else:
                self._apply(settings, tokenizers)
            self.settings = settings
            self.policy = (settings.strategy, dict(settings.policy_params))

    def _apply(self, settings: Any, tokenizers: dict[str, Any]) -> None:
        """Settings into the running router: policy, index mode, queue bound, tenants and adapters through
        ``Router.configure``; API keys, tokenizers and GPU-class profiles beside it."""
        router = self.server.router
        router.configure(settings)  # raises ValueError (a bad policy param) before anything changes
        router.set_api_keys(self.api_keys if settings.tenant_secret is not None else None)
        router.config.tokenizers = tokenizers
        router.pool.set_profiles(settings.profiles)
        self.pager.update(self._adapter_infos(settings), self._paging_config(settings))

    @staticmethod
    def _adapter_infos(settings: Any) -> list[AdapterInfo]:
        return [AdapterInfo(a.name, a.base_model, a.source) for a in settings.adapters.values()]

    @staticmethod
    def _paging_config(settings: Any) -> PagingConfig:
        return PagingConfig.from_specs(settings.paging, settings.paging)

    async def _start(self, settings: Any, tokenizers: dict[str, Any]) -> None:
        from corral.router.server import RouterConfig, RouterServer

        cfg = RouterConfig.from_settings(
            settings,
            router_id=self.router_id,
            api_keys=self.api_keys if settings.tenant_secret is not None else None,
            tokenizers=tokenizers,
            selection_state_dir=self.selection_state_dir,
        )
        self.discovery = RayRegistryDiscovery(self.pool_id, self.namespace, poll_interval_s=0.5)
        from corral.router.tls import router_tls

        front_tls, engine_tls = router_tls(self.tls)  # a bad certificate folder fails the replica, named
        server = RouterServer(self.discovery, cfg, on_dispatch=self._on_dispatch, engine_tls=engine_tls)
        fleet = server.fleet
        if getattr(fleet, "clock", None) is None:
            fleet.clock = server.router.now  # samples are stamped with this router's clock on receipt
        server.router.pool.set_profiles(settings.profiles)
        self.pager = AdapterPager(fleet, GrpcAdapterControl(server.router.pool), [])
        self.pager.update(self._adapter_infos(settings), self._paging_config(settings))
        server.router.selection.on_forecast = self._on_forecast  # a bandit's expected demand (issue 15)
        await server.start(host=self.host, grpc_port=self.grpc_port, http_port=self.http_port, tls=front_tls)
        self.server = server
        adv = advertised_host(self.host, self.advertise_host)
        self.grpc_address = _with_host(server.grpc_address, adv)
        self.http_url = _with_host(server.http_url, adv)
        self.record = {
            "grpc": self.grpc_address,
            "http": self.http_url,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "node_id": _node_id(),
            "started": time.time(),
        }
        self.heartbeat = RegistryHeartbeat(
            self.namespace, self.pool_id, self.router_id, self.record, "router", 2.0
        )
        await self.heartbeat.start()
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="corral-paging-lease"),
            asyncio.create_task(self.pager.run(self._stop, lambda: self._leader), name="corral-paging"),
        ]
        log.info("router %s: gRPC %s, HTTP %s", self.router_id, self.grpc_address, self.http_url)

    def _on_dispatch(self, replica_id: str, req: Any) -> None:
        """Feed the pager's demand tracker from the router's dispatch accounting."""
        self.pager.on_dispatch(req.adapter)

    def _on_forecast(self, arm: str, share: float) -> None:
        """A model-selection bandit's expected share for an adapter it did not pick this time: demand the
        pager can prefetch for (the picked one is counted at dispatch)."""
        if arm in self.pager.adapters:
            self.pager.demand.record(arm, self.pager.clock(), share)  # type: ignore[arg-type]

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

    # ---- views (tests, tooling) ---------------------------------------------------------------------------
    def addresses(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "grpc": self.grpc_address,
            "http": self.http_url,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "node_id": _node_id(),
            "policy": self.policy[0],
            "policy_params": self.policy[1],
            "models": self.models,
            "paging_leader": self._leader,
            "replicas": sorted(self.server.fleet.replicas) if self.server is not None else [],
        }

    def router_settings(self) -> dict[str, Any]:
        """What this router runs with (tests): the RouterConfig fields set from the CRs."""
        cfg = self.server.router.config
        return {
            "strategy": cfg.policy,
            "policy_params": dict(cfg.policy_params),
            "index_mode": cfg.index_mode,
            "fleet_index_mode": self.server.fleet.index_mode,
            "max_queue_per_replica": cfg.max_queue_per_replica,
            "isolate_tenants": cfg.isolate_tenants,
            "auth": cfg.api_keys is not None,
            "adapters": sorted(cfg.adapters),
            "tokenizers": sorted(cfg.tokenizers),
            "profiles": {k: p.model_dump() for k, p in self.server.router.pool.profiles.items()},
        }

    def fleet_view(self) -> dict[str, Any]:
        """This router's view of each engine replica (tests, ``corral`` tooling). ``sample_age_s``: how
        long ago (this router's clock) the replica's last load sample arrived; None before the first."""
        if self.server is None:
            return {}
        now = self.server.router.now()
        return {
            rid: {
                "model": r.model,
                "gpu_class": r.gpu_class,
                "healthy": r.healthy,
                "address": r.address,
                "profile": r.profile.name,
                "b1_us": r.profile.b1_us,
                "adapters_gpu": sorted(r.adapters_gpu),
                "adapters_cpu": sorted(r.adapters_cpu),
                "dispatched": r.dispatched_total,
                "sample_age_s": now - r.sample_received_at if r.last_sample is not None else None,
            }
            for rid, r in self.server.fleet.replicas.items()
        }

    def sample_view(self, ahead_s: float = 0.0) -> dict[str, Any]:
        """How this router judges each replica's last load sample (tests): its engine-clock ``time``, when
        it arrived on this router's clock, and whether the policy counts it now and ``ahead_s`` later."""
        from corral.router.policies._common import fresh_sample

        if self.server is None:
            return {"router_id": self.router_id, "replicas": {}}
        now = self.server.router.now()
        params = getattr(self.server.router.policy, "params", None)
        max_age = float(getattr(params, "sample_max_age_s", 5.0))
        out = {}
        for rid, r in self.server.fleet.replicas.items():
            s = r.last_sample
            out[rid] = {
                "engine_time": s.time if s is not None else None,
                "received_at": r.sample_received_at if s is not None else None,
                "age_s": now - r.sample_received_at if s is not None else None,
                "fresh": fresh_sample(r, now, max_age) is not None,
                "fresh_later": fresh_sample(r, now + ahead_s, max_age) is not None,
            }
        return {"router_id": self.router_id, "node_id": _node_id(), "now": now, "max_age_s": max_age,
                "replicas": out}  # fmt: skip

    def paging_stats(self) -> dict[str, Any]:
        s = self.pager.stats
        return {"loads": s.loads, "unloads": s.unloads, "prefetches": s.prefetches, "failures": s.failures,
                "targets": dict(s.last_targets), "leader": self._leader}  # fmt: skip

    def residency(self) -> dict[str, dict[str, list[str]]]:
        """Adapters loaded on each engine replica as this router sees them (every router sees every engine
        replica of its pool): ``{replica_id: {"gpu": [...], "cpu": [...]}}``."""
        if self.server is None:
            return {}
        return {
            rid: {"gpu": sorted(r.adapters_gpu), "cpu": sorted(r.adapters_cpu)}
            for rid, r in self.server.fleet.replicas.items()
        }

    def __call__(self, *_: Any) -> dict[str, Any]:
        """``GET <Serve HTTP>/corral/<pool id>``: this replica's :meth:`addresses` and the pool's adapter
        :meth:`residency` (read by the operator's timer for ``status.adapterResidency``)."""
        return {**self.addresses(), "residency": self.residency()}

    async def check_health(self) -> None:
        if self._stop.is_set():
            raise RuntimeError("router replica is shutting down")
        if self.server is None:  # deployed without a user_config: run with the RoutingPolicy defaults
            await self.reconfigure({})

    async def __del__(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            reg = await aget_registry(self.namespace, create=False, timeout_s=2)
            await reg.release_lease.remote(self._lease_key, self.router_id)
        if self.heartbeat is not None:
            with contextlib.suppress(Exception):
                await self.heartbeat.stop()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop(0.5)
