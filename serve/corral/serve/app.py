"""ModelPool + RoutingPolicy -> Ray Serve: the pure translation (the Serve application builder that runs
its result is :mod:`corral.serve.application`).

:func:`plan_pool` turns the two custom resources (the :mod:`corral.api` models; plain CR dicts are first
validated into them, so there is one path and the CRD's defaults are the only defaults) into a
:class:`PoolPlan`: one engine deployment per (model, GPU class) with that class's placement
(``num_gpus``, ``accelerator_type`` for real GPUs, and a custom per-class resource, see
:func:`gpu_class_resource`), its replica count and engine arguments, plus one router deployment whose
``user_config`` carries the RoutingPolicy spec (so a RoutingPolicy change is a live ``reconfigure``, not
a restart). The router side of the translation is :func:`corral.router.settings.router_settings`: the
router replica runs it on the pool and the policy it is given. From the plan come both forms Ray accepts:

- :meth:`PoolPlan.serve_application` / :func:`serve_config`: the Serve config file (``ServeDeploySchema``
  JSON, what KubeRay's ``serveConfigV2`` and the dashboard's REST API take), whose ``import_path`` is
  :func:`corral.serve.application.build_app`, a Serve *application builder* receiving the pool, the
  options and the engines' block size back as ``args``;
- :func:`corral.serve.application.build_application`: the Python ``Application`` for ``serve.run``.

Nothing here imports Ray at module import time (the operator and ``corral validate`` use it).

Serve carries the engines (placement, replica count, health checks, restarts), never the tokens: engine
replicas publish their own gRPC address in the registry and the router streams to them directly.
Because of that, Serve's request-based autoscaling cannot see engine load, so replica counts are fixed
from the CR (``replicas``, else ``minReplicas``); scaling is the operator's job.

Where each CR field goes:

- ``models[]``: ``name``, ``baseModel``, ``engine``, ``engineArgs`` (passed to the engine as given) and
  ``maxModelLen`` (passed only when set: unset means the engine's own default) -> the engine deployment;
  ``maxModelLen`` and ``tokenizer`` also reach the router (``RouterSettings.models``).
- ``gpuClasses[]``: ``gpusPerReplica`` / ``acceleratorType`` / the class resource -> Ray placement;
  ``nodeSelector`` -> :attr:`EngineDeploymentPlan.node_selector`, for the operator to put on the class's
  worker group (the Kubernetes nodes that declare the class resource; Ray itself places by the resource);
  ``replicas`` / ``minReplicas`` -> replica count (``maxReplicas`` bounds the operator's scaling);
  ``profile`` + ``profileOverrides`` -> the sim engine and the router's cost model.
- ``adapters`` / ``adapterCache`` -> engines (``max_loras``, ``max_cpu_loras`` = ``cpuSlots``, which is
  ``gpuSlots`` when unset) and the router (catalog, paging).
- ``kvOffload`` -> engines: vLLM ``kv_offloading_size`` / ``kv_offloading_backend`` (when ``cpuGib`` > 0,
  unless ``engineArgs`` set them), the simulator's CPU KV tier of the same size.
- the RoutingPolicy -> the router's ``user_config`` (see :func:`corral.router.settings.router_settings`),
  except ``blockSize``, which the engines need at start (it is in ``args``, so changing it restarts them);
  ``tenants`` needs a source of API keys (:attr:`ServeOptions.api_keys_file`), else the plan fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.api.modelpool import ModelPool
from corral.api.routingpolicy import RoutingPolicy
from corral.router.settings import RouterSettings, default_policy_spec, router_settings
from pydantic import ValidationError

APP_BUILDER_IMPORT_PATH = "corral.serve.application:build_app"
ENGINE_DEPLOYMENT_PREFIX = "engine"
ROUTER_DEPLOYMENT_NAME = "router"
DEFAULT_NAMESPACE = "corral"  # Ray namespace of the registry actor
GPU_CLASS_RESOURCE_PREFIX = "corral.dev/gpu-class-"

_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class PlanError(ValueError):
    """The CRs (or the options) cannot be served as given; the message is one line naming the field."""


def gpu_class_resource(gpu_class: str) -> str:
    """The Ray custom resource that marks nodes of a GPU class (count = GPUs per node).

    Worker groups (or the local node) declare ``{gpu_class_resource(cls): gpus}``; each engine replica of
    that class asks for ``gpusPerReplica`` of it, so replicas land on their class and pack like GPUs,
    whether the engine is vLLM (which also asks ``num_gpus``) or the CPU simulator (which does not).
    Ray accepts any string as a resource name; this one (``corral.dev/gpu-class-<class>``) contains a ``/``,
    so quote it (or pass it as JSON, e.g. ``ray start --resources '{"corral.dev/gpu-class-h100": 8}'``)
    wherever a tool splits names on ``/``.
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
    # Tenant API keys for the routers when the RoutingPolicy sets ``tenants``: a YAML/JSON file mapping
    # key -> tenant (the router's --api-keys format), readable on every node that runs a router. The
    # operator will point this at the policy's Secret mounted into the Ray pods.
    api_keys_file: str | None = None
    # TLS (corral.router.tls): folders laid out like a mounted kubernetes.io/tls Secret (tls.crt, tls.key,
    # ca.crt). router_tls_dir: the routers' HTTPS and gRPC fronts (router_client_auth: clients must show a
    # certificate signed by its ca.crt). engine_tls_dir: the router <-> engine link, mutual TLS with the same
    # folder on both sides (engines are dialled by IP: their certificate must name engine_tls_server_name).
    router_tls_dir: str | None = None
    router_client_auth: bool = False
    engine_tls_dir: str | None = None
    engine_tls_server_name: str = "corral-engine"
    # Model selection (spec.modelSelection): the folder where the routers keep their bandits' state, so it
    # survives restarts and is shared by the router replicas (a volume all of them mount; each writes only
    # its own file, see docs/model-selection.md). None: in memory only.
    selection_state_dir: str | None = None

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
    # the GPU class's nodeSelector: where the operator schedules this class's Ray worker group (whose
    # nodes declare the class resource the replicas ask for); Ray itself places by that resource
    node_selector: dict[str, str] = field(default_factory=dict)


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
    pool: ModelPool
    policy: RoutingPolicy | None
    settings: RouterSettings  # what the routers will run with (they derive it again from pool + policy)

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

        Serve hashes ``import_path``, ``runtime_env`` and ``args`` into the application's code version, and
        a new code version restarts every replica. So ``args`` carry only what engines are built from
        (:func:`structural_pool`, the options and the policy's ``blockSize``); routine changes travel where
        Serve applies them in place: replica counts in each deployment's ``num_replicas``, the adapter
        catalog and the whole ModelPool + RoutingPolicy in ``user_config`` (a live ``reconfigure``).
        """
        return {
            "name": self.app_name,
            "route_prefix": f"/corral/{self.pool_id}",
            "import_path": APP_BUILDER_IMPORT_PATH,
            "args": {
                "pool": structural_pool(self.pool),
                "options": self.options.to_dict(),
                "blockSize": self.settings.block_size,  # engines start with it: a change restarts them
            },
            "deployments": self.deployment_schemas(),
        }

    def summary(self) -> list[str]:
        lines = []
        for e in self.engines:
            capped = f" (scaled down from {e.scaled_down_from})" if e.scaled_down_from is not None else ""
            lines.append(f"{e.name}: {e.num_replicas} x {e.engine} on {e.gpu_class}{capped}")
        lines.append(f"{self.router.name}: {self.router.num_replicas} replica(s)")
        return lines


def _validated(cls: type[ModelPool] | type[RoutingPolicy], obj: Any) -> Any:
    """``obj`` as the API model ``cls`` (a dict, e.g. a CR read from YAML, is validated into it)."""
    if isinstance(obj, cls):
        return obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a {cls.__name__} (corral.api model or CR dict), got {type(obj).__name__}")
    try:
        return cls.model_validate(dict(obj))
    except ValidationError as e:
        from corral.api.validation import error_lines

        name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), Mapping) else None
        problems = "; ".join(f"{path}: {msg}" for path, msg in error_lines(e))
        raise PlanError(f"{cls.__name__} {name or '(unnamed)'} is invalid: {problems}") from None


def pool_id_of(pool: ModelPool | Mapping[str, Any]) -> str:
    meta = pool.metadata if isinstance(pool, ModelPool) else None
    if meta is not None:
        name, ns = meta.name, meta.namespace
    else:
        m = (pool.get("metadata") or {}) if isinstance(pool, Mapping) else {}
        name, ns = m.get("name") or "pool", m.get("namespace")
    return _NAME_SAFE.sub("_", f"{ns}.{name}" if ns and ns != "default" else name)


def adapter_catalog(pool: ModelPool) -> list[dict[str, Any]]:
    """The pool's adapters as ``{name, baseModel, source, rank}`` dicts (engines and tools share it)."""
    return [
        {"name": a.name, "baseModel": a.base_model, "source": a.source, "rank": a.rank}
        for a in pool.spec.adapters
    ]


def plan_pool(
    pool: ModelPool | Mapping[str, Any],
    policy: RoutingPolicy | Mapping[str, Any] | None = None,
    options: ServeOptions | Mapping[str, Any] | None = None,
    *,
    block_size: int | None = None,
) -> PoolPlan:
    """Translate a ModelPool (+ RoutingPolicy) into the deployments that serve it. Pure.

    ``pool`` and ``policy`` are the :mod:`corral.api` models (dicts are validated into them first);
    ``policy`` None means the RoutingPolicy defaults. ``block_size`` is the engines' KV block size when
    the policy is not given (the Serve builder: the policy is not in ``args``, its ``blockSize`` is).
    """
    opts = options if isinstance(options, ServeOptions) else ServeOptions.from_dict(options)
    mp: ModelPool = _validated(ModelPool, pool)
    rp: RoutingPolicy | None = None if policy is None else _validated(RoutingPolicy, policy)
    pool_id = pool_id_of(mp)
    settings = router_settings(rp, mp)
    if rp is not None and block_size is not None and block_size != settings.block_size:
        raise PlanError(
            f"block_size {block_size} disagrees with RoutingPolicy {rp.metadata.name} "
            f"spec.blockSize {settings.block_size}"
        )
    engine_block_size = settings.block_size if rp is not None or block_size is None else int(block_size)
    if settings.tenant_secret is not None and not opts.api_keys_file:
        secret, key = settings.tenant_secret
        raise PlanError(
            f"RoutingPolicy {rp.metadata.name if rp else ''} sets spec.tenants (API keys in Secret "
            f"{secret!r}, key {key!r}) but no API keys source is configured for the routers "
            "(ServeOptions.api_keys_file, e.g. `corral serve --api-keys FILE`): refusing to serve open"
        )
    spec = mp.spec
    adapters = adapter_catalog(mp)
    gpu_slots, cpu_slots = spec.adapter_cache.gpu_slots, spec.adapter_cache.effective_cpu_slots

    engines: list[EngineDeploymentPlan] = []
    for m in spec.models:
        engine = opts.engine_override or m.engine
        if engine not in ("sim", "vllm", "echo"):
            raise PlanError(f"model {m.name}: unknown engine {engine!r} (sim, vllm)")
        for c in spec.gpu_classes:
            gpus = float(c.gpus_per_replica)
            want = c.desired_replicas
            n = want if opts.max_replicas_per_class is None else min(want, opts.max_replicas_per_class)
            actor: dict[str, Any] = {
                "num_cpus": opts.engine_num_cpus,
                "num_gpus": gpus if engine == "vllm" else 0,
                "resources": {gpu_class_resource(c.name): gpus},
            }
            if c.accelerator_type and engine == "vllm":
                actor["accelerator_type"] = c.accelerator_type
            env = dict(opts.extra_env)
            if engine == "vllm":
                env.setdefault("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
            if env:
                actor["runtime_env"] = {"env_vars": env}
            overrides = c.profile_overrides.model_dump(exclude_none=True) if c.profile_overrides else {}
            init = {
                "pool_id": pool_id,
                "model": m.name,
                "base_model": m.base_model,
                "engine": engine,
                "engine_args": dict(m.engine_args),
                "max_model_len": m.max_model_len,  # None: the engine's own default
                "gpu_class": c.name,
                "profile": c.profile,
                "profile_overrides": overrides,
                "gpus_per_replica": gpus,
                "block_size": engine_block_size,
                "max_loras": gpu_slots,
                "max_cpu_loras": cpu_slots,
                "kv_offload_gib": spec.kv_offload.cpu_gib,
                "kv_offload_backend": spec.kv_offload.backend,
                "namespace": opts.namespace,
                "sim_time_scale": opts.sim_time_scale,
                "heartbeat_s": opts.heartbeat_s,
                "advertise_host": opts.advertise_host,
                "tls_dir": opts.engine_tls_dir,
            }
            engines.append(
                EngineDeploymentPlan(
                    name=deployment_name(m.name, c.name),
                    model=m.name,
                    gpu_class=c.name,
                    engine=engine,
                    num_replicas=n,
                    ray_actor_options=actor,
                    max_ongoing_requests=opts.engine_max_ongoing_requests,
                    init_kwargs=init,
                    user_config={"adapters": [a for a in adapters if a["baseModel"] == m.name]},
                    scaled_down_from=want if n != want else None,
                    node_selector=dict(c.node_selector),
                )
            )

    policy_spec = rp.spec if rp is not None else default_policy_spec(mp.metadata.name)
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
            "api_keys_file": opts.api_keys_file,
            "selection_state_dir": opts.selection_state_dir,
            "tls": {
                "router_dir": opts.router_tls_dir,
                "client_auth": opts.router_client_auth,
                "engine_dir": opts.engine_tls_dir,
                "engine_server_name": opts.engine_tls_server_name,
            },
            "models": [{"name": m.name, "maxModelLen": m.max_model_len} for m in spec.models],
        },
        # The policy spec (camelCase, every field explicit) is all a reconfigure needs; the adapter
        # catalog is there for tools (the router derives its own from the pool).
        user_config={"policy": policy_spec.to_k8s(), "pool": mp.to_k8s(), "adapters": adapters},
        max_replicas_per_node=1 if (opts.router_grpc_port or opts.router_http_port) else None,
    )
    return PoolPlan(
        app_name=f"corral-{pool_id}",
        pool_id=pool_id,
        engines=engines,
        router=router,
        options=opts,
        pool=mp,
        policy=rp,
        settings=settings,
    )


def structural_pool(mp: ModelPool) -> dict[str, Any]:
    """The part of a ModelPool that engine replicas are built from (the Serve application's ``args``):
    models, GPU classes without their replica counts, the adapter cache sizes; name and namespace only of
    the metadata. Replica counts (``num_replicas``) and adapters (``user_config``) are left out, so
    changing them keeps the application's code version and Serve applies them in place."""
    cr = mp.to_k8s()
    spec = dict(cr["spec"])
    spec.pop("adapters", None)
    spec.pop("routingPolicyRef", None)
    classes = []
    for c in spec.get("gpuClasses", []):
        c = {k: v for k, v in c.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
        classes.append({**c, "minReplicas": 1, "maxReplicas": 1})  # placeholders: num_replicas rules
    spec["gpuClasses"] = classes
    meta = {k: v for k, v in cr["metadata"].items() if k in ("name", "namespace")}
    return {"apiVersion": cr["apiVersion"], "kind": cr["kind"], "metadata": meta, "spec": spec}


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
