"""ModelPool + RoutingPolicy -> Ray Serve: the pure translation, and the Serve application builder.

:func:`plan_pool` turns the two custom resources into a :class:`PoolPlan`: one engine deployment per
(model, GPU class) with that class's placement (``num_gpus``, ``accelerator_type`` for real GPUs, and a
custom per-class resource, see :func:`gpu_class_resource`), its replica count and engine arguments, plus
one router deployment whose ``user_config`` carries the routing policy (so a RoutingPolicy change is a
live ``reconfigure``, not a restart). From the plan come both forms Ray accepts:

- :meth:`PoolPlan.serve_application` / :func:`serve_config`: the Serve config file (``ServeDeploySchema``
  JSON, what KubeRay's ``serveConfigV2`` and the dashboard's REST API take), whose ``import_path`` is
  :func:`build_app`, a Serve *application builder* receiving the CRs back as ``args``;
- :func:`build_application`: the Python ``Application`` for ``serve.run`` (local mode, tests).

Nothing here imports Ray at module import time (the operator and ``corral validate`` use it), and the
inputs may be the pydantic API models or the plain CR dicts (camelCase, as written in YAML).

Serve carries the engines (placement, replica count, health checks, restarts), never the tokens: engine
replicas publish their own gRPC address in the registry and the router streams to them directly.
Because of that, Serve's request-based autoscaling cannot see engine load, so replica counts are fixed
from the CR (``replicas``, else ``minReplicas``); scaling is the operator's job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

APP_BUILDER_IMPORT_PATH = "corral.serve.app:build_app"
ENGINE_DEPLOYMENT_PREFIX = "engine"
ROUTER_DEPLOYMENT_NAME = "router"
DEFAULT_NAMESPACE = "corral"  # Ray namespace of the registry actor
GPU_CLASS_RESOURCE_PREFIX = "corral.dev/gpu-class-"

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def gpu_class_resource(gpu_class: str) -> str:
    """The Ray custom resource that marks nodes of a GPU class (count = GPUs per node).

    Worker groups (or the local node) declare ``{gpu_class_resource(cls): gpus}``; each engine replica of
    that class asks for ``gpusPerReplica`` of it, so replicas land on their class and pack like GPUs,
    whether the engine is vLLM (which also asks ``num_gpus``) or the CPU simulator (which does not).
    Ray accepts any string here; this one avoids ``/`` so that it also survives tools that split on it.
    """
    return GPU_CLASS_RESOURCE_PREFIX + gpu_class


def deployment_name(model: str, gpu_class: str) -> str:
    return _NAME_SAFE.sub("_", f"{ENGINE_DEPLOYMENT_PREFIX}-{model}-{gpu_class}")


# ---- options ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServeOptions:
    """How to run a pool on Ray, beyond what the CRs say (operator or CLI settings)."""

    namespace: str = DEFAULT_NAMESPACE
    router_replicas: int = 1
    router_host: str = "0.0.0.0"
    router_grpc_port: int = 50051  # 0 = ephemeral (addresses are published in the registry)
    router_http_port: int = 8080
    router_num_cpus: float = 1.0
    engine_num_cpus: float = 1.0
    max_replicas_per_class: int | None = None  # cap (local mode on a small machine)
    engine_max_ongoing_requests: int = 64  # control calls only; tokens never pass through Serve
    router_max_ongoing_requests: int = 64
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    sim_time_scale: float = 1.0  # >1 runs the simulator faster than wall clock
    heartbeat_s: float = 2.0  # engine -> registry refresh; entries expire after 3x this
    advertise_host: str | None = None  # engines' published host (default: the node IP)
    engine_override: str | None = None  # run every model on this engine ("sim", or "echo" for benchmarks)
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ServeOptions:
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown serve options: {', '.join(sorted(unknown))}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- plan -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class EngineDeploymentPlan:
    name: str
    model: str
    gpu_class: str
    engine: str
    num_replicas: int
    ray_actor_options: dict[str, Any]
    max_ongoing_requests: int
    init_kwargs: dict[str, Any]
    user_config: dict[str, Any]
    scaled_down_from: int | None = None  # replicas the CR asked for, when capped by the options


@dataclass(slots=True)
class RouterDeploymentPlan:
    name: str
    num_replicas: int
    ray_actor_options: dict[str, Any]
    max_ongoing_requests: int
    init_kwargs: dict[str, Any]
    user_config: dict[str, Any]
    max_replicas_per_node: int | None = None  # 1 when the router listens on fixed ports


@dataclass(slots=True)
class PoolPlan:
    app_name: str
    pool_id: str
    engines: list[EngineDeploymentPlan]
    router: RouterDeploymentPlan
    options: ServeOptions
    pool: dict[str, Any]
    policy: dict[str, Any]

    def deployment_schemas(self) -> list[dict[str, Any]]:
        out = []
        deployments: list[EngineDeploymentPlan | RouterDeploymentPlan] = [*self.engines, self.router]
        for d in deployments:
            extra = {}
            if isinstance(d, RouterDeploymentPlan) and d.max_replicas_per_node is not None:
                extra["max_replicas_per_node"] = d.max_replicas_per_node
            out.append(
                {
                    **extra,
                    "name": d.name,
                    "num_replicas": d.num_replicas,
                    "max_ongoing_requests": d.max_ongoing_requests,
                    "user_config": d.user_config,
                    "ray_actor_options": d.ray_actor_options,
                    "health_check_period_s": self.options.health_check_period_s,
                    "health_check_timeout_s": self.options.health_check_timeout_s,
                }
            )
        return out

    def serve_application(self) -> dict[str, Any]:
        """This pool as one ``ServeApplicationSchema`` entry (``applications[]`` of a Serve config).

        The RoutingPolicy is deliberately *not* in ``args``: Serve hashes ``import_path``, ``runtime_env``
        and ``args`` into the application's code version, and a new code version restarts every replica.
        The policy travels only in the router deployment's ``user_config``, so changing it is an in-place
        ``reconfigure`` of the routers and leaves the engines alone.
        """
        return {
            "name": self.app_name,
            "route_prefix": f"/corral/{self.pool_id}",
            "import_path": APP_BUILDER_IMPORT_PATH,
            "args": {"pool": self.pool, "options": self.options.to_dict()},
            "deployments": self.deployment_schemas(),
        }

    def summary(self) -> list[str]:
        lines = []
        for e in self.engines:
            capped = f" (scaled down from {e.scaled_down_from})" if e.scaled_down_from is not None else ""
            lines.append(f"{e.name}: {e.num_replicas} x {e.engine} on {e.gpu_class}{capped}")
        lines.append(f"{self.router.name}: {self.router.num_replicas} replica(s)")
        return lines


def _as_cr(obj: Any) -> dict[str, Any]:
    """A CR as a plain camelCase dict (from a pydantic model or a dict)."""
    if obj is None:
        return {}
    if hasattr(obj, "model_dump"):
        return obj.model_dump(by_alias=True, mode="json", exclude_none=True)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"expected a CR (pydantic model or dict), got {type(obj).__name__}")


def _spec(cr: Mapping[str, Any]) -> dict[str, Any]:
    return dict(cr.get("spec", cr)) if "spec" in cr or "apiVersion" in cr else dict(cr)


def _get(d: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _snake_keys(d: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"kvCapacityTokens": 1}`` -> ``{"kv_capacity_tokens": 1}`` (GpuProfile field names)."""
    items = (d or {}).items()
    return {re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", k).lower(): v for k, v in items if v is not None}


def pool_id_of(pool_cr: Mapping[str, Any]) -> str:
    meta = pool_cr.get("metadata") or {}
    name = meta.get("name") or "pool"
    ns = meta.get("namespace")
    return _NAME_SAFE.sub("_", f"{ns}.{name}" if ns and ns != "default" else name)


def adapter_catalog(pool_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pool's adapters as ``{name, baseModel, source, rank}`` dicts (engines and routers share it)."""
    out = []
    for a in _get(pool_spec, "adapters", default=[]) or []:
        out.append(
            {
                "name": a["name"],
                "baseModel": _get(a, "baseModel", "base_model"),
                "source": _get(a, "source", "sourceUri", "uri", default=""),
                "rank": _get(a, "rank", default=None),
            }
        )
    return out


def plan_pool(
    pool: Any, policy: Any = None, options: ServeOptions | Mapping[str, Any] | None = None
) -> PoolPlan:
    """Translate a ModelPool (+ RoutingPolicy) into the deployments that serve it. Pure."""
    opts = options if isinstance(options, ServeOptions) else ServeOptions.from_dict(options)
    pool_cr, policy_cr = _as_cr(pool), _as_cr(policy)
    spec, pspec = _spec(pool_cr), _spec(policy_cr)
    pool_id = pool_id_of(pool_cr)
    models = _get(spec, "models", default=[]) or []
    classes = _get(spec, "gpuClasses", "gpu_classes", default=[]) or []
    if not models:
        raise ValueError(f"ModelPool {pool_id}: spec.models is empty")
    if not classes:
        raise ValueError(f"ModelPool {pool_id}: spec.gpuClasses is empty")
    cache = _get(spec, "adapterCache", "adapter_cache", default={}) or {}
    adapters = adapter_catalog(spec)
    block_size = int(_get(pspec, "blockSize", "block_size", default=16))

    engines: list[EngineDeploymentPlan] = []
    for m in models:
        mname = m["name"]
        engine = opts.engine_override or str(_get(m, "engine", default="sim"))
        if engine not in ("sim", "vllm", "echo"):
            raise ValueError(f"model {mname}: unknown engine {engine!r} (sim, vllm)")
        for c in classes:
            cname = c["name"]
            gpus = float(_get(c, "gpusPerReplica", "gpus_per_replica", default=1))
            want = int(_get(c, "replicas", default=None) or _get(c, "minReplicas", "min_replicas", default=1))
            n = want
            if opts.max_replicas_per_class is not None:
                n = min(n, opts.max_replicas_per_class)
            actor: dict[str, Any] = {
                "num_cpus": opts.engine_num_cpus,
                "num_gpus": gpus if engine == "vllm" else 0,
                "resources": {gpu_class_resource(cname): gpus},
            }
            accel = _get(c, "acceleratorType", "accelerator_type")
            if accel and engine == "vllm":
                actor["accelerator_type"] = accel
            env = dict(opts.extra_env)
            if engine == "vllm":
                env.setdefault("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
            if env:
                actor["runtime_env"] = {"env_vars": env}
            init = {
                "pool_id": pool_id,
                "model": mname,
                "base_model": _get(m, "baseModel", "base_model", default=mname),
                "engine": engine,
                "engine_args": dict(_get(m, "engineArgs", "engine_args", default={}) or {}),
                "max_model_len": int(_get(m, "maxModelLen", "max_model_len", default=8192)),
                "gpu_class": cname,
                "profile": _get(c, "profile", default=None) or cname,
                "profile_overrides": _snake_keys(_get(c, "profileOverrides", "profile_overrides")),
                "gpus_per_replica": gpus,
                "block_size": block_size,
                "max_loras": int(_get(cache, "gpuSlots", "gpu_slots", default=4)),
                "max_cpu_loras": int(_get(cache, "cpuSlots", "cpu_slots", default=8)),
                "namespace": opts.namespace,
                "sim_time_scale": opts.sim_time_scale,
                "heartbeat_s": opts.heartbeat_s,
                "advertise_host": opts.advertise_host,
            }
            engines.append(
                EngineDeploymentPlan(
                    name=deployment_name(mname, cname),
                    model=mname,
                    gpu_class=cname,
                    engine=engine,
                    num_replicas=n,
                    ray_actor_options=actor,
                    max_ongoing_requests=opts.engine_max_ongoing_requests,
                    init_kwargs=init,
                    user_config={"adapters": [a for a in adapters if a["baseModel"] in (mname, None)]},
                    scaled_down_from=want if n != want else None,
                )
            )

    router = RouterDeploymentPlan(
        name=ROUTER_DEPLOYMENT_NAME,
        num_replicas=opts.router_replicas,
        ray_actor_options={"num_cpus": opts.router_num_cpus},
        max_ongoing_requests=opts.router_max_ongoing_requests,
        init_kwargs={
            "pool_id": pool_id,
            "namespace": opts.namespace,
            "host": opts.router_host,
            "grpc_port": opts.router_grpc_port,
            "http_port": opts.router_http_port,
            "advertise_host": opts.advertise_host,
            "models": [
                {
                    "name": m["name"],
                    "maxModelLen": int(_get(m, "maxModelLen", "max_model_len", default=8192)),
                }
                for m in models
            ],
        },
        user_config={"policy": pspec, "adapters": adapters, "adapterCache": dict(cache)},
        max_replicas_per_node=1 if (opts.router_grpc_port or opts.router_http_port) else None,
    )
    return PoolPlan(
        app_name=f"corral-{pool_id}",
        pool_id=pool_id,
        engines=engines,
        router=router,
        options=opts,
        pool=pool_cr,
        policy=policy_cr,
    )


def serve_config(
    plans: list[PoolPlan] | PoolPlan,
    http_options: Mapping[str, Any] | None = None,
    proxy_location: str = "HeadOnly",
) -> dict[str, Any]:
    """The Serve config file (``ServeDeploySchema`` JSON) for one or more pools."""
    plans = [plans] if isinstance(plans, PoolPlan) else plans
    cfg: dict[str, Any] = {
        "proxy_location": proxy_location,
        "applications": [p.serve_application() for p in plans],
    }
    if http_options:
        cfg["http_options"] = dict(http_options)
    return cfg


# ---- Serve application ------------------------------------------------------------------------------


def build_application(plan: PoolPlan) -> Any:
    """The Serve ``Application`` of a plan: engine deployments bound into the router (the ingress)."""
    from . import deployments

    engine_dep: Any = deployments.EngineDeployment  # Serve Deployment objects (typed as classes)
    router_dep: Any = deployments.RouterDeployment

    engines = [
        engine_dep.options(
            name=e.name,
            num_replicas=e.num_replicas,
            ray_actor_options=e.ray_actor_options,
            max_ongoing_requests=e.max_ongoing_requests,
            user_config=e.user_config,
            health_check_period_s=plan.options.health_check_period_s,
            health_check_timeout_s=plan.options.health_check_timeout_s,
        ).bind(**e.init_kwargs)
        for e in plan.engines
    ]
    r = plan.router
    extra: dict[str, Any] = {}
    if r.max_replicas_per_node is not None:
        extra["max_replicas_per_node"] = r.max_replicas_per_node
    return router_dep.options(
        **extra,
        name=r.name,
        num_replicas=r.num_replicas,
        ray_actor_options=r.ray_actor_options,
        max_ongoing_requests=r.max_ongoing_requests,
        user_config=r.user_config,
        health_check_period_s=plan.options.health_check_period_s,
        health_check_timeout_s=plan.options.health_check_timeout_s,
    ).bind(engines=engines, **r.init_kwargs)


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: corral.serve.app:build_app``; ``args``: pool, options
    and optionally policy; the config's per-deployment ``user_config`` carries the policy)."""
    return build_application(plan_pool(args["pool"], args.get("policy"), args.get("options")))
