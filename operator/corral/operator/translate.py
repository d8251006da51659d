"""ModelPool + RoutingPolicy -> the objects the operator writes. Pure: no API calls, no kopf, no Ray.

Two targets (:data:`TARGETS`):

``rayservice``
    :func:`ray_service`: a KubeRay ``ray.io/v1`` RayService. ``spec.serveConfigV2`` is the YAML of
    :func:`corral.serve.app.serve_config` of :func:`corral.serve.app.plan_pool` (the one CR -> Serve
    translation, never re-derived here); ``spec.rayClusterConfig`` has a head group and one worker group per
    GPU class of the pool.
``ray``
    :func:`serve_rest_config`: the Serve config for an existing Ray cluster, ``PUT`` to its dashboard's
    :data:`SERVE_REST_PATH`. That endpoint is declarative (applications it is not given are deleted), so it
    takes every pool deployed to that cluster at once.

KubeRay's update rules (KubeRay v1.5 ``rayservice_controller.go``: ``shouldUpdateCluster``,
``generateHashWithoutReplicasAndWorkersToDelete``) and how this module keeps routine changes in place:

* a change of ``serveConfigV2`` alone is PUT to the running cluster's dashboard: no new cluster. A
  RoutingPolicy change (router ``user_config``), adapters and Serve replica counts only touch it;
* the cluster spec is hashed without each worker group's ``replicas``/``minReplicas``/``maxReplicas``/
  ``workersToDelete``: a replica change of a GPU class changes only those fields of its group (and
  ``serveConfigV2``), so no new cluster. Nothing else in a group depends on replica counts or on the
  models, adapters or policy (pods per class = replicas x models; each pod holds one engine replica).
  KubeRay does not copy replica counts into a running RayCluster (they belong to whoever scales it,
  normally Ray's autoscaler): the operator scales the live RayClusters itself with :func:`scale_patch`,
  as the autoscaler would, and the RayService's counts are what a new cluster starts with;
* worker groups *appended at the end* are added in place; any other cluster change (a group removed or
  reordered, a template, image or ``rayStartParams`` change) makes KubeRay build a whole new cluster and
  switch over (2x GPUs for a while). So :func:`ray_service` takes the live RayService (``existing``) and
  keeps its groups in their order: a new GPU class is appended last wherever it is in the pool's list, and
  a class removed from the pool keeps its group, scaled to 0 (retired in place, not a new cluster).
  Changing a class's ``nodeSelector`` or ``gpusPerReplica``, or the operator's image, does roll a new
  cluster: that is a real change of the pods.

Every object carries the label ``corral.dev/pool: <pool>`` (:data:`POOL_LABEL`, also on the pod templates,
so KubeRay's pods carry it) and, when the pool's uid is known, a controller ownerReference to the
ModelPool, so deleting the pool garbage-collects what the operator made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import yaml
from corral.api.common import API_VERSION
from corral.api.modelpool import GpuClass, ModelPool
from corral.api.routingpolicy import RoutingPolicy
from corral.api.validation import error_lines
from corral.router.settings import router_settings
from corral.serve.app import (
    PoolPlan,
    ServeOptions,
    gpu_class_resource,
    plan_pool,
    pool_id_of,
    serve_config,
)
from pydantic import ValidationError

Target = Literal["rayservice", "ray"]
TARGETS: tuple[Target, ...] = ("rayservice", "ray")
TARGET_ANNOTATION = "corral.dev/target"
"""Per-pool choice of target on the ModelPool (``rayservice`` or ``ray``); else the operator's default."""

POOL_LABEL = "corral.dev/pool"
GPU_CLASS_LABEL = "corral.dev/gpu-class"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "corral-operator"

RAY_API_VERSION = "ray.io/v1"
RAYSERVICE_NAME_MAX = 47  # KubeRay v1.5 utils.MaxRayServiceNameLength (RayCluster max 53 - 6)
WORKER_GROUP_PREFIX = "gpu-"
HEAD_CONTAINER, WORKER_CONTAINER = "ray-head", "ray-worker"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
API_KEYS_DIR = "/etc/corral/api-keys"  # where a RoutingPolicy's tenants Secret is mounted in Ray pods
API_KEYS_VOLUME = "corral-api-keys"
ROUTER_TLS_DIR = "/etc/corral/tls/router"  # RayServiceOptions.router_tls_secret, mounted in Ray pods
ENGINE_TLS_DIR = "/etc/corral/tls/engine"  # RayServiceOptions.engine_tls_secret (router <-> engine mTLS)
SERVE_REST_PATH = "/api/serve/applications/"
APP_PREFIX = "corral-"  # Serve applications named so are Corral's (corral.serve.app: "corral-<pool id>")
DEFAULT_RAY_VERSION = "2.60.0"  # the ray[serve] Corral pins
DEFAULT_IMAGE = "corral-ray:latest"

_DNS1035_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class RayServiceOptions:
    """Operator settings for the RayService target (what the CRs do not say)."""

    image: str = DEFAULT_IMAGE  # Ray image with corral[serve] installed (the Serve app imports it)
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = DEFAULT_RAY_VERSION
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu: str = "8"  # per engine pod (one engine replica per pod)
    worker_memory: str = "64Gi"
    service_account: str | None = None
    serve: Mapping[str, Any] = field(default_factory=dict)  # corral.serve.app.ServeOptions fields
    # TLS Secrets (kubernetes.io/tls: tls.crt, tls.key, ca.crt) in each pool's namespace, mounted into the
    # Ray pods: the routers' HTTPS/gRPC fronts (client_auth: clients need a certificate signed by ca.crt),
    # and the router <-> engine link (mutual TLS; the certificate must name ServeOptions'
    # engine_tls_server_name, "corral-engine" by default)
    router_tls_secret: str | None = None
    router_client_auth: bool = False
    engine_tls_secret: str | None = None

    def serve_with_tls(self) -> dict[str, Any]:
        """:attr:`serve` plus the mounted TLS folders (explicit ServeOptions win)."""
        serve = dict(self.serve)
        if self.router_tls_secret:
            serve.setdefault("router_tls_dir", ROUTER_TLS_DIR)
            serve.setdefault("router_client_auth", self.router_client_auth)
        if self.engine_tls_secret:
            serve.setdefault("engine_tls_dir", ENGINE_TLS_DIR)
        return serve


# ------------------------------------------------------------------------------------------ inputs


def _clean(obj: ModelPool | RoutingPolicy | Mapping[str, Any], cls: type[Any]) -> Any:
    """The CR as its API model, reduced to what serving depends on: apiVersion, kind, name, namespace
    and spec. Server-set metadata (uid, resourceVersion, generation, managedFields), labels,
    annotations and status are dropped, so they never reach ``serveConfigV2`` (a status write must not
    change what KubeRay deploys)."""
    body = obj.to_k8s() if isinstance(obj, cls) else dict(obj)
    meta = body.get("metadata") or {}
    keep = {k: meta[k] for k in ("name", "namespace") if meta.get(k) is not None}
    reduced = {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": cls.__name__,
        "metadata": keep,
        "spec": body.get("spec"),
    }
    try:
        return cls.model_validate(reduced)
    except ValidationError as e:
        problems = "; ".join(f"{path}: {msg}" for path, msg in error_lines(e))
        raise ValueError(f"{cls.__name__} {keep.get('name') or '(unnamed)'} is invalid: {problems}") from None


def clean_pool(pool: ModelPool | Mapping[str, Any]) -> ModelPool:
    result: ModelPool = _clean(pool, ModelPool)
    return result


def clean_policy(policy: RoutingPolicy | Mapping[str, Any] | None) -> RoutingPolicy | None:
    if policy is None:
        return None
    result: RoutingPolicy = _clean(policy, RoutingPolicy)
    return result


def _meta(obj: ModelPool | RoutingPolicy | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(obj, ModelPool | RoutingPolicy):
        return obj.metadata.model_dump(by_alias=True, exclude_none=True)
    return dict(obj.get("metadata") or {})


def target_of(pool: ModelPool | Mapping[str, Any], default: Target = "rayservice") -> Target:
    """The pool's target: its :data:`TARGET_ANNOTATION`, else ``default``. ValueError when unknown."""
    value = (_meta(pool).get("annotations") or {}).get(TARGET_ANNOTATION, default)
    if value not in TARGETS:
        raise ValueError(f"annotation {TARGET_ANNOTATION}={value!r}: expected one of {', '.join(TARGETS)}")
    target: Target = value
    return target


def owner_reference(pool: ModelPool | Mapping[str, Any]) -> dict[str, Any] | None:
    """Controller ownerReference to the ModelPool (None when its uid is unknown, e.g. a file)."""
    meta = _meta(pool)
    if not meta.get("uid"):
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPool",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def rayservice_name(pool_name: str) -> str:
    """The RayService of a pool: its name as a DNS-1035 label of at most 47 characters (KubeRay's limit;
    longer or non-conforming names are shortened with a hash so two pools never share one)."""
    name = _DNS1035_BAD.sub("-", pool_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"mp-{name}".rstrip("-")
    if name == pool_name and len(name) <= RAYSERVICE_NAME_MAX:
        return name
    digest = hashlib.sha256(pool_name.encode()).hexdigest()[:6]
    return f"{name[: RAYSERVICE_NAME_MAX - 7].rstrip('-')}-{digest}"


def worker_group_name(gpu_class: str) -> str:
    return WORKER_GROUP_PREFIX + gpu_class.replace(".", "-")


# ------------------------------------------------------------------------------------------ serve side


def serve_options(
    pool: ModelPool, policy: RoutingPolicy | None, options: Mapping[str, Any] | ServeOptions | None
) -> ServeOptions:
    """ServeOptions for a pool run by the operator: the operator's settings, plus the routers' API keys
    file when the RoutingPolicy sets tenants (its Secret is mounted at :data:`API_KEYS_DIR`)."""
    opts = options if isinstance(options, ServeOptions) else ServeOptions.from_dict(options)
    secret = router_settings(policy, pool).tenant_secret
    if secret is not None and not opts.api_keys_file:
        opts = replace(opts, api_keys_file=f"{API_KEYS_DIR}/{secret[1]}")
    return opts


def plan(
    pool: ModelPool | Mapping[str, Any],
    policy: RoutingPolicy | Mapping[str, Any] | None,
    options: Mapping[str, Any] | ServeOptions | None = None,
) -> PoolPlan:
    """:func:`corral.serve.app.plan_pool` of the cleaned CRs (see :func:`clean_pool`)."""
    mp, rp = clean_pool(pool), clean_policy(policy)
    return plan_pool(mp, rp, serve_options(mp, rp, options))


def serve_config_yaml(cfg: Mapping[str, Any]) -> str:
    """``serveConfigV2``: the Serve config as a YAML string (stable key order: the plan's)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)


def serve_rest_config(
    pools: Iterable[tuple[ModelPool | Mapping[str, Any], RoutingPolicy | Mapping[str, Any] | None]],
    options: Mapping[str, Any] | ServeOptions | None = None,
    *,
    http_options: Mapping[str, Any] | None = None,
    current: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Target ``ray``: the JSON body of ``PUT <dashboard>/api/serve/applications/`` for every pool
    deployed to one Ray cluster. The endpoint is declarative (applications it is not given are deleted),
    so the applications of ``current`` (the ``GET`` of the same endpoint) that are not Corral's
    (:data:`APP_PREFIX`) are kept as they were deployed."""
    plans = [plan(p, rp, options) for p, rp in pools]
    names = [p.app_name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two pools map to the same Serve application: {', '.join(dup)}")
    cfg = serve_config(plans, http_options=http_options)
    for name, app in sorted(((current or {}).get("applications") or {}).items()):
        deployed = (app or {}).get("deployed_app_config")
        if not name.startswith(APP_PREFIX) and deployed:
            cfg["applications"].append(dict(deployed))
    return cfg


def app_name(pool: ModelPool | Mapping[str, Any]) -> str:
    """The Serve application of a pool (``corral-<pool id>``)."""
    return f"{APP_PREFIX}{pool_id_of(clean_pool(pool))}"


# ------------------------------------------------------------------------------------------ RayService


def _pod_labels(pool_name: str, gpu_class: str | None = None) -> dict[str, str]:
    labels = {POOL_LABEL: pool_name}
    if gpu_class is not None:
        labels[GPU_CLASS_LABEL] = gpu_class
    return labels


def _api_keys_volume(secret: tuple[str, str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if secret is None:
        return [], []
    volumes = [{"name": API_KEYS_VOLUME, "secret": {"secretName": secret[0]}}]
    mounts = [{"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}]
    return volumes, mounts


def _pod_spec(
    container: dict[str, Any], opts: RayServiceOptions, secret: tuple[str, str] | None, **extra: Any
) -> dict[str, Any]:
    volumes, mounts = _api_keys_volume(secret)
    for name, secret_name, path in (
        ("corral-router-tls", opts.router_tls_secret, ROUTER_TLS_DIR),
        ("corral-engine-tls", opts.engine_tls_secret, ENGINE_TLS_DIR),
    ):
        if secret_name:  # a folder mount (no subPath): a renewed certificate reaches the pod
            volumes.append({"name": name, "secret": {"secretName": secret_name}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {**extra, "containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    return spec


def head_group(pool_name: str, opts: RayServiceOptions, secret: tuple[str, str] | None) -> dict[str, Any]:
    """The head: GCS, dashboard, Serve controller and proxy; ``num-gpus 0`` keeps engines off it."""
    res = {"cpu": opts.head_cpu, "memory": opts.head_memory}
    container = {
        "name": HEAD_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": 8000, "name": "serve"},
        ],
        "resources": {"limits": dict(res), "requests": dict(res)},
    }
    return {
        "rayStartParams": {"num-gpus": "0"},
        "template": {
            "metadata": {"labels": _pod_labels(pool_name)},
            "spec": _pod_spec(container, opts, secret),
        },
    }


def worker_group(
    pool_name: str,
    gpu_class: GpuClass,
    n_models: int,
    opts: RayServiceOptions,
    secret: tuple[str, str] | None,
) -> dict[str, Any]:
    """One GPU class: one pod per engine replica (replicas x models pods), each with ``gpusPerReplica``
    GPUs, on the class's nodes, declaring the class's Ray resource (:func:`gpu_class_resource`)."""
    gpus = int(gpu_class.gpus_per_replica)
    res = {"cpu": opts.worker_cpu, "memory": opts.worker_memory, GPU_RESOURCE: str(gpus)}
    container = {
        "name": WORKER_CONTAINER,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "resources": {"limits": dict(res), "requests": dict(res)},
    }
    ray_resources = json.dumps({gpu_class_resource(gpu_class.name): gpus}, separators=(",", ":"))
    return {
        "groupName": worker_group_name(gpu_class.name),
        "replicas": gpu_class.desired_replicas * n_models,
        "minReplicas": gpu_class.min_replicas * n_models,
        "maxReplicas": gpu_class.max_replicas * n_models,
        # single-quoted: KubeRay pastes it into the `ray start` shell command (and trims the quotes
        # when it reads it back); num-gpus comes from the nvidia.com/gpu limit
        "rayStartParams": {"resources": f"'{ray_resources}'"},
        "template": {
            "metadata": {"labels": _pod_labels(pool_name, gpu_class.name)},
            "spec": _pod_spec(
                container,
                opts,
                secret,
                nodeSelector=dict(gpu_class.node_selector),
                tolerations=[dict(GPU_TOLERATION)],
            ),
        },
    }


def _retired(group: Mapping[str, Any]) -> dict[str, Any]:
    """A live worker group whose class left the pool: kept as it is, scaled to zero (removing it would
    make KubeRay build a new cluster)."""
    out = json.loads(json.dumps(group))
    out.update(replicas=0, minReplicas=0, maxReplicas=0)
    out.get("scaleStrategy", {}).pop("workersToDelete", None)
    return out


def ordered_worker_groups(
    desired: Sequence[dict[str, Any]], existing: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Worker groups in the live order: existing groups where they are (retired to 0 replicas when their
    class is gone), then new groups appended in the pool's order."""
    by_name = {g["groupName"]: g for g in desired}
    out: list[dict[str, Any]] = []
    for g in existing:
        name = g.get("groupName")
        out.append(by_name.pop(name) if name in by_name else _retired(g))
    out.extend(g for g in desired if g["groupName"] in by_name)
    return out


def ray_service(
    pool: ModelPool | Mapping[str, Any],
    policy: RoutingPolicy | Mapping[str, Any] | None,
    options: RayServiceOptions | None = None,
    existing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Target ``rayservice``: the RayService of a pool (see the module doc for the update rules).

    ``pool`` and ``policy`` are the CRs (API models or dicts as read from the apiserver: metadata uid
    gives the ownerReference); ``existing`` is the live RayService, if any, whose worker-group order is
    kept. ValueError when the CRs are invalid or cannot be served (the message says why).
    """
    opts = options or RayServiceOptions()
    mp, rp = clean_pool(pool), clean_policy(policy)
    p = plan_pool(mp, rp, serve_options(mp, rp, opts.serve_with_tls()))
    secret = p.settings.tenant_secret
    pool_name = mp.metadata.name
    n_models = len(mp.spec.models)
    desired = [worker_group(pool_name, c, n_models, opts, secret) for c in mp.spec.gpu_classes]
    live_groups = ((existing or {}).get("spec") or {}).get("rayClusterConfig", {}).get(
        "workerGroupSpecs"
    ) or []
    metadata: dict[str, Any] = {
        "name": rayservice_name(pool_name),
        "labels": {POOL_LABEL: pool_name, MANAGED_BY_LABEL: MANAGED_BY},
    }
    if mp.metadata.namespace:
        metadata["namespace"] = mp.metadata.namespace
    ref = owner_reference(pool)
    if ref is not None:
        metadata["ownerReferences"] = [ref]
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": serve_config_yaml(serve_config(p)),
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterConfig": {
                "rayVersion": opts.ray_version,
                # replica counts come from the CR (the operator scales), not from Ray's autoscaler
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head_group(pool_name, opts, secret),
                "workerGroupSpecs": ordered_worker_groups(desired, live_groups),
            },
        },
    }


def cluster_hash_view(rayservice: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a RayService's cluster spec whose change makes KubeRay build a new cluster: the spec
    without each worker group's replicas / minReplicas / maxReplicas / workersToDelete (what KubeRay
    v1.5 hashes). For tests and for the operator's Events ("in place" vs "new cluster")."""
    spec = json.loads(json.dumps(rayservice["spec"]["rayClusterConfig"]))
    for g in spec.get("workerGroupSpecs", []):
        for k in ("replicas", "minReplicas", "maxReplicas"):
            g.pop(k, None)
        g.get("scaleStrategy", {}).pop("workersToDelete", None)
    return dict(spec)


UpdateKind = Literal["none", "serve-config", "in-place", "new-cluster"]


def update_kind(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> UpdateKind:
    """How KubeRay v1.5 will apply ``new`` over ``old``: nothing, a Serve config PUT only, an in-place
    cluster update (replicas, groups appended at the end), or a new cluster.

    ``old`` is the RayService as generated before, not as read back: the stored object also carries the
    CRD's defaults (KubeRay hashes the stored spec both times, so those never count as a change)."""
    if old is None:
        return "new-cluster"
    old_view, new_view = cluster_hash_view(old), cluster_hash_view(new)
    if old_view != new_view:
        n = len(old_view.get("workerGroupSpecs", []))
        appended = {**new_view, "workerGroupSpecs": new_view.get("workerGroupSpecs", [])[:n]}
        if len(new_view.get("workerGroupSpecs", [])) < n or appended != old_view:
            return "new-cluster"
        return "in-place"
    if old["spec"]["rayClusterConfig"] != new["spec"]["rayClusterConfig"]:
        return "in-place"
    if old["spec"].get("serveConfigV2") != new["spec"].get("serveConfigV2"):
        return "serve-config"
    return "none"


def _counts(group: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(group.get(k) or 0) for k in ("replicas", "minReplicas", "maxReplicas")}


def scale_patch(rayservice: Mapping[str, Any], ray_cluster: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON patch (RFC 6902) giving a live RayCluster the worker-group replica counts of the RayService.

    Groups are matched by name; each edit is guarded by a ``test`` of the group's name at that index, so
    a cluster whose groups moved meanwhile rejects the patch instead of scaling the wrong group. Empty
    when nothing differs (or the cluster lacks the RayService's groups: KubeRay adds those itself)."""
    want = {g["groupName"]: _counts(g) for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    ops: list[dict[str, Any]] = []
    for i, g in enumerate((ray_cluster.get("spec") or {}).get("workerGroupSpecs") or []):
        name = g.get("groupName")
        if name not in want or _counts(g) == want[name]:
            continue
        ops.append({"op": "test", "path": f"/spec/workerGroupSpecs/{i}/groupName", "value": name})
        have = _counts(g)
        for k in ("maxReplicas", "minReplicas", "replicas"):
            if have[k] != want[name][k]:
                op = "replace" if k in g else "add"
                ops.append({"op": op, "path": f"/spec/workerGroupSpecs/{i}/{k}", "value": want[name][k]})
    return ops
