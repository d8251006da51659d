"""kopf handlers: ModelPool + RoutingPolicy -> KubeRay RayService (target ``rayservice``).

Importing this module registers the handlers in kopf's default registry; ``corral operator run`` (see
:mod:`corral.operator.cli`) sets :data:`CONFIG` and starts kopf. The translation is
:func:`corral.operator.translate.ray_service`; this module only reads the CRs, applies what it returns
(server-side apply, field manager ``corral-operator``), and reports.

* ModelPool create / update / resume: find its RoutingPolicy (``spec.routingPolicyRef``, else the one
  policy whose ``poolRef`` names the pool, else the defaults), build the RayService (keeping the live
  worker-group order), dry-run apply it to learn what KubeRay will do (``translate.update_kind`` on the
  stored, defaulted objects), apply it if anything changed, scale the live RayClusters'
  worker groups (``translate.scale_patch``; KubeRay does not), post an Event saying which kind of change
  it was, and write the status: conditions Ready / Progressing / Degraded (with observedGeneration),
  per-class desired/ready replicas. A pool that cannot be translated (invalid, or an unusable
  policy) gets Degraded + a Warning Event and is not retried until it changes; API errors are retried.
* ModelPool delete (finalizer ``corral.dev/finalizer``): deletes the RayService and waits until it is
  gone (KubeRay then removes its RayClusters), then kopf removes the finalizer.
* RoutingPolicy create / update / resume / delete: reconciles its pool (a policy change is a
  ``serveConfigV2``-only change: the routers' ``user_config``, applied in place). A policy whose pool does
  not exist is Degraded with a message naming it and is retried every ``retry_delay_s``, so it recovers
  by itself when the pool appears; a timer keeps its Ready in step with its pool's.
* a timer refreshes each pool's status from its RayService (KubeRay's Ready condition, Serve deployment
  health); target ``ray``: another one writes ``status.adapterResidency`` as the pool's routers see it
  (:func:`router_view`).

Target ``ray`` (annotation ``corral.dev/target: ray`` or ``--target ray``; an existing Ray cluster at
``--ray-address``): every change PUTs :func:`corral.operator.translate.serve_rest_config` of all watched
``ray`` pools to the dashboard's Serve REST API (declarative: other applications on that cluster are kept
as deployed), deletion PUTs the config without the pool, and Ready follows the Serve application's
status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import translate as t
from .kube import (
    GROUP,
    POLICIES,
    POOLS,
    RAY_GROUP,
    RAY_VERSION,
    RAYCLUSTERS,
    RAYSERVICES,
    VERSION,
    Kube,
    condition,
    merge_conditions,
)

FINALIZER = "corral.dev/finalizer"
REPORTING_COMPONENT = "corral-operator"
BACKOFF_S = 5.0  # retry delay of a handler that failed unexpectedly (kopf's default is 60 s)


@dataclass
class OperatorConfig:
    target: t.Target = "rayservice"
    rayservice: t.RayServiceOptions = field(default_factory=t.RayServiceOptions)  # .serve: both targets
    retry_delay_s: float = 5.0
    ray_address: str | None = None  # target ray: the dashboard, e.g. http://127.0.0.1:8265
    http_options: dict[str, Any] | None = None  # target ray: Serve's http_options in the PUT


CONFIG = OperatorConfig()
"""Set by ``corral operator run`` before kopf starts (module state: kopf handlers are module functions)."""

PEERING_LIFETIME = 30
"""Seconds a replica's peering keep-alive counts (``--peering-lifetime``): a replica silent for longer is
dead to the others, and the next one by priority takes over."""

_KUBE: Kube | None = None


def kube() -> Kube:
    global _KUBE
    if _KUBE is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            api = config.new_client_from_config()
        _KUBE = Kube(api)
    return _KUBE


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.reporting_component = REPORTING_COMPONENT
    # progress and diff-base in annotations only (the CRDs' structural status schema would prune kopf's
    # status fields anyway)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="corral.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="corral.dev", key="last-handled-configuration"
    )
    settings.execution.max_workers = 4
    settings.peering.lifetime = PEERING_LIFETIME
    kube()


# ------------------------------------------------------------------------------------------ lookup


@kopf.index(GROUP, VERSION, POLICIES)
def policies_by_pool(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[Any, str]:
    """(namespace, poolRef) -> names of the RoutingPolicies that route it."""
    return {(namespace, spec.get("poolRef")): name}


@kopf.index(GROUP, VERSION, POOLS)
def all_pools(namespace: str | None, name: str, **_: Any) -> dict[str, tuple[str | None, str]]:
    """Every watched ModelPool (target ``ray``: the dashboard's config holds all of them at once)."""
    return {"all": (namespace, name)}


def _body(obj: Mapping[str, Any]) -> kopf.Body:
    return obj if isinstance(obj, kopf.Body) else kopf.Body(dict(obj))  # type: ignore[arg-type]


def _alive(obj: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp") else obj


def find_policy(
    k: Kube, pool: Mapping[str, Any], index: Mapping[Any, Any] | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The pool's RoutingPolicy body (None: the defaults) and a problem that makes the pool Degraded."""
    meta, spec = pool["metadata"], pool.get("spec") or {}
    ns, name = meta.get("namespace", "default"), meta["name"]
    ref = spec.get("routingPolicyRef")
    if ref:
        policy = _alive(k.get(GROUP, VERSION, POLICIES, ns, ref))
        if policy is None:
            return None, f"RoutingPolicy {ns}/{ref} (spec.routingPolicyRef) not found: using the defaults"
        return dict(policy), None
    names = sorted(set((index or {}).get((ns, name), [])))
    live = [p for p in (_alive(k.get(GROUP, VERSION, POLICIES, ns, n)) for n in names) if p is not None]
    if len(live) > 1:
        listed = ", ".join(p["metadata"]["name"] for p in live)
        return None, f"several RoutingPolicies name pool {name} ({listed}): set spec.routingPolicyRef"
    return (dict(live[0]) if live else None), None


# ------------------------------------------------------------------------------------------ pools


def _rs_status(rs: Mapping[str, Any] | None) -> tuple[bool, str, str]:
    """KubeRay's Ready condition of a RayService: (ready, reason, message)."""
    for c in ((rs or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True", c.get("reason") or "Unknown", c.get("message") or ""
    return False, "Initializing", "KubeRay has not reported on the RayService yet"


def _healthy_deployments(rs: Mapping[str, Any] | None) -> set[str]:
    active = ((rs or {}).get("status") or {}).get("activeServiceStatus") or {}
    out = set()
    for app in (active.get("applicationStatuses") or {}).values():
        for dep, st in (app.get("serveDeploymentStatuses") or {}).items():
            if st.get("status") == "HEALTHY":
                out.add(dep)
    return out


def pool_status(
    pool: Mapping[str, Any],
    rs: Mapping[str, Any] | None,
    *,
    problem: tuple[str, str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The ModelPool's status from its spec, its RayService (or a view of its Serve application in the
    same shape, named by ``source``) and a problem ``(reason, message)``."""
    from corral.serve.app import deployment_name

    gen = pool["metadata"].get("generation")
    spec = pool.get("spec") or {}
    models = [m.get("name") for m in spec.get("models") or []]
    healthy = _healthy_deployments(rs)
    classes = []
    for c in spec.get("gpuClasses") or []:
        desired = c.get("replicas", c.get("minReplicas", 1))
        ready = sum(desired for m in models if deployment_name(str(m), c["name"]) in healthy)
        classes.append({"name": c["name"], "desiredReplicas": desired * len(models), "readyReplicas": ready})
    ready, reason, message = _rs_status(rs)
    if problem is not None:
        conds = [
            condition("Ready", ready, reason if ready else "NotReady", message, generation=gen),
            condition("Progressing", False, problem[0], problem[1], generation=gen),
            condition("Degraded", True, problem[0], problem[1], generation=gen),
        ]
    else:
        what = source or f"RayService {(rs or {}).get('metadata', {}).get('name', '')}"
        msg = f"{what}: {reason}" + (f": {message}" if message else "")
        conds = [
            condition("Ready", ready, "RayServiceReady" if ready else reason, msg, generation=gen),
            condition(
                "Progressing", not ready, "Deploying" if not ready else "Deployed", msg, generation=gen
            ),
            condition("Degraded", False, "AsExpected", "", generation=gen),
        ]
    old = (pool.get("status") or {}).get("conditions")
    return {
        "observedGeneration": gen,
        "conditions": merge_conditions(old, conds),
        "modelCount": len(models),
        "adapterCount": len(spec.get("adapters") or []),
        "desiredReplicas": sum(c["desiredReplicas"] for c in classes),
        "readyReplicas": sum(c["readyReplicas"] for c in classes),
        "gpuClasses": classes,
    }


_CHANGE = {
    "new-cluster": "applied; KubeRay builds a new Ray cluster and switches over",
    "in-place": "applied; KubeRay updates the running Ray cluster in place (replicas / appended groups)",
    "serve-config": "serveConfigV2 applied; KubeRay updates the Serve applications in place",
}


def reconcile_pool(
    k: Kube,
    pool: Mapping[str, Any],
    index: Mapping[Any, Any] | None,
    logger: logging.Logger | Any,
    pools: Mapping[Any, Any] | None = None,
) -> dict[str, Any]:
    """Make the pool's RayService match the CRs; returns the pool's new status (the caller writes it)."""
    meta = pool["metadata"]
    ns = meta.get("namespace", "default")
    try:
        target = t.target_of(pool, CONFIG.target)
    except ValueError as exc:
        kopf.warn(_body(pool), reason="InvalidTarget", message=str(exc))
        return pool_status(pool, None, problem=("InvalidTarget", str(exc)))
    if target == "ray":
        return reconcile_ray_target(k, pool, index, pools, logger)

    policy, policy_problem = find_policy(k, pool, index)
    rs_name = t.rayservice_name(meta["name"])
    live = k.get(RAY_GROUP, RAY_VERSION, RAYSERVICES, ns, rs_name)
    try:
        desired = t.ray_service(pool, policy, CONFIG.rayservice, existing=live)
    except ValueError as exc:
        kopf.warn(_body(pool), reason="InvalidSpec", message=str(exc))
        return pool_status(pool, live, problem=("InvalidSpec", str(exc)))

    planned = k.apply(RAY_GROUP, RAY_VERSION, RAYSERVICES, desired, dry_run=True)
    kind = t.update_kind(live, planned) if live is not None else "new-cluster"
    meta_changed = live is not None and any(
        (live["metadata"].get(f) or {}) != (planned["metadata"].get(f) or {})
        for f in ("labels", "ownerReferences")
    )
    if kind != "none" or meta_changed:
        verb = "RayServiceCreated" if live is None else "RayServiceUpdated"
        live = k.apply(RAY_GROUP, RAY_VERSION, RAYSERVICES, desired)
        note = _CHANGE.get(kind, "metadata applied")
        kopf.info(_body(pool), reason=verb, message=f"RayService {ns}/{rs_name} {note}")
        logger.info("RayService %s/%s: %s", ns, rs_name, kind)

    selector = f"ray.io/originated-from-cr-name={rs_name}"
    for rc in k.list(RAY_GROUP, RAY_VERSION, RAYCLUSTERS, ns, selector):
        ops = t.scale_patch(desired, rc)
        if ops:
            rc_name = rc["metadata"]["name"]
            k.json_patch(RAY_GROUP, RAY_VERSION, RAYCLUSTERS, ns, rc_name, ops)
            kopf.info(_body(pool), reason="Scaled", message=f"RayCluster {ns}/{rc_name} worker groups scaled")
    if policy_problem:
        kopf.warn(_body(pool), reason="RoutingPolicyMissing", message=policy_problem)
        return pool_status(pool, live, problem=("RoutingPolicyMissing", policy_problem))
    return pool_status(pool, live)


# ------------------------------------------------------------------------------------------ target ray


def _dashboard(method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    """A call to the Ray dashboard of target ``ray`` (JSON in and out)."""
    import json
    import urllib.request

    if not CONFIG.ray_address:
        raise kopf.PermanentError("target ray needs the operator's --ray-address")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        CONFIG.ray_address.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def deploy_ray_target(
    k: Kube,
    index: Mapping[Any, Any] | None,
    pools: Mapping[Any, Any] | None,
    *,
    exclude: tuple[str, str] | None = None,
) -> dict[tuple[str, str], str]:
    """PUT the Serve config of every watched pool with target ``ray`` (but ``exclude``) to the dashboard,
    keeping other applications. Returns the pools left out because they cannot be planned, with why."""
    import urllib.error

    chosen, bad = [], {}
    for ns, name in sorted(set((pools or {}).get("all", [])), key=str):
        key = (ns or "default", name)
        if key == exclude:
            continue
        body = _alive(k.get(GROUP, VERSION, POOLS, key[0], name))
        if body is None:
            continue
        try:
            if t.target_of(body, CONFIG.target) != "ray":
                continue
            policy, _problem = find_policy(k, body, index)
            t.plan(body, policy, CONFIG.rayservice.serve)  # plannable on its own?
        except ValueError as exc:
            bad[key] = str(exc)
            continue
        chosen.append((body, policy))
    try:
        current = _dashboard("GET", t.SERVE_REST_PATH + "?api_type=declarative")
        cfg = t.serve_rest_config(
            chosen, CONFIG.rayservice.serve, http_options=CONFIG.http_options, current=current
        )
        _dashboard("PUT", t.SERVE_REST_PATH, cfg)
    except (urllib.error.URLError, OSError) as exc:
        raise kopf.TemporaryError(
            f"Ray dashboard {CONFIG.ray_address}: {exc}", delay=CONFIG.retry_delay_s
        ) from exc
    return bad


def _serve_app(pool: Mapping[str, Any]) -> tuple[bool, str, str, dict[str, Any]]:
    """(running, status, message, deployments) of the pool's Serve application on the target-``ray``
    cluster."""
    import urllib.error

    try:
        details = _dashboard("GET", t.SERVE_REST_PATH) or {}
    except (urllib.error.URLError, OSError) as exc:
        return False, "DashboardUnreachable", str(exc), {}
    app = (details.get("applications") or {}).get(t.app_name(pool))
    if not app:
        return False, "NotDeployed", "no such Serve application yet", {}
    running = app.get("status") == "RUNNING"
    return (
        running,
        str(app.get("status") or "Unknown"),
        str(app.get("message") or ""),
        app.get("deployments") or {},
    )


def ray_pool_status(pool: Mapping[str, Any], problem: tuple[str, str] | None = None) -> dict[str, Any]:
    """The pool's status from its Serve application, in the shape :func:`pool_status` reads."""
    running, status, message, deployments = _serve_app(pool)
    ready = {"type": "Ready", "status": "True" if running else "False", "reason": status, "message": message}
    deps = {n: {"status": (d or {}).get("status")} for n, d in deployments.items()}
    view = {
        "status": {
            "conditions": [ready],
            "activeServiceStatus": {
                "applicationStatuses": {t.app_name(pool): {"serveDeploymentStatuses": deps}}
            },
        }
    }
    return pool_status(pool, view, problem=problem, source=f"Serve application {t.app_name(pool)}")


def reconcile_ray_target(
    k: Kube,
    pool: Mapping[str, Any],
    index: Mapping[Any, Any] | None,
    pools: Mapping[Any, Any] | None,
    logger: logging.Logger | Any,
) -> dict[str, Any]:
    meta = pool["metadata"]
    key = (meta.get("namespace") or "default", meta["name"])
    if not CONFIG.ray_address:
        msg = "target 'ray' needs the operator started with --ray-address"
        kopf.warn(_body(pool), reason="TargetNotConfigured", message=msg)
        return pool_status(pool, None, problem=("TargetNotConfigured", msg))
    bad = deploy_ray_target(k, index, pools)
    if key in bad:
        kopf.warn(_body(pool), reason="InvalidSpec", message=bad[key])
        return pool_status(pool, None, problem=("InvalidSpec", bad[key]))
    kopf.info(_body(pool), reason="ServeConfigApplied", message=f"Serve config PUT to {CONFIG.ray_address}")
    logger.info("Serve config with %s PUT to %s", t.app_name(pool), CONFIG.ray_address)
    _policy, problem = find_policy(k, pool, index)
    return ray_pool_status(pool, ("RoutingPolicyMissing", problem) if problem else None)


RESIDENCY_INTERVAL_S = 5.0


def serve_http_url() -> str | None:
    """Target ``ray``: Serve's HTTP proxy (the dashboard's host, ``--http-port`` or Serve's 8000)."""
    from urllib.parse import urlsplit

    if not CONFIG.ray_address:
        return None
    host = urlsplit(CONFIG.ray_address).hostname or "127.0.0.1"
    port = (CONFIG.http_options or {}).get("port") or 8000
    return f"http://{host}:{port}"


def router_view(pool: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """Target ``ray``: what one of the pool's routers answers at ``<Serve HTTP>/corral/<pool id>`` (its
    gRPC/HTTP addresses, policy and the adapters on each engine replica, see
    ``corral.serve.deployments.RouterDeployment.__call__``); None while it does not answer."""
    import json
    import urllib.error
    import urllib.request

    from corral.serve.app import pool_id_of

    base = serve_http_url()
    if base is None:
        return None
    try:
        with urllib.request.urlopen(f"{base}/corral/{pool_id_of(pool)}", timeout=timeout) as resp:
            view = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return view if isinstance(view, dict) else None


def adapter_residency(
    pool: Mapping[str, Any], residency: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``status.adapterResidency``: for each adapter of the pool, the engine replicas holding it on the GPU
    and in host memory (from a router's ``{replica_id: {"gpu": [...], "cpu": [...]}}``)."""
    out = []
    for a in (pool.get("spec") or {}).get("adapters") or []:
        name = a.get("name")
        gpu = sorted(rid for rid, r in residency.items() if name in (r.get("gpu") or []))
        cpu = sorted(rid for rid, r in residency.items() if name in (r.get("cpu") or []))
        out.append({"name": name, "gpuReplicas": gpu, "cpuReplicas": cpu})
    return out


def _ray_target(body: kopf.Body, **_: Any) -> bool:
    try:
        return t.target_of(body, CONFIG.target) == "ray"
    except ValueError:
        return False


@kopf.timer(GROUP, VERSION, POOLS, interval=RESIDENCY_INTERVAL_S, initial_delay=2.0, when=_ray_target)
def adapter_residency_refresh(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    """Target ``ray``: ``status.adapterResidency`` from the pool's routers (each router sees every engine
    replica's loaded adapters through its event stream); written only when it changed. (Target
    ``rayservice``: the routers run in the cluster, behind the RayService's Serve service, which an
    operator outside the cluster cannot reach; not read yet.)"""
    view = router_view(body)
    if view is None:
        logger.debug("no router of %s answers yet", t.app_name(body))
        return
    residency = adapter_residency(body, view.get("residency") or {})
    if (body.get("status") or {}).get("adapterResidency") != residency:
        patch.status["adapterResidency"] = residency


def _write_pool_status(patch: kopf.Patch, status: Mapping[str, Any]) -> None:
    for key, value in status.items():
        patch.status[key] = value


def _retry(exc: ApiException, what: str) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"{what}: API error {exc.status} {exc.reason}", delay=CONFIG.retry_delay_s)


@kopf.on.create(GROUP, VERSION, POOLS, backoff=BACKOFF_S)
@kopf.on.update(GROUP, VERSION, POOLS, backoff=BACKOFF_S)
@kopf.on.resume(GROUP, VERSION, POOLS, backoff=BACKOFF_S)
def pool_changed(body: kopf.Body, patch: kopf.Patch, logger: Any, **kw: Any) -> None:
    try:
        status = reconcile_pool(kube(), body, kw.get("policies_by_pool"), logger, kw.get("all_pools"))
    except ApiException as exc:
        raise _retry(exc, "reconciling the RayService") from exc
    _write_pool_status(patch, status)


@kopf.on.delete(GROUP, VERSION, POOLS, backoff=BACKOFF_S)
def pool_deleted(body: kopf.Body, name: str, namespace: str | None, **kw: Any) -> None:
    k = kube()
    namespace = namespace or "default"
    try:
        target = t.target_of(body, CONFIG.target)
    except ValueError:
        target = "rayservice"
    if target == "ray" and CONFIG.ray_address:
        deploy_ray_target(k, kw.get("policies_by_pool"), kw.get("all_pools"), exclude=(namespace, name))
        kopf.info(
            body,
            reason="ServeApplicationDeleted",
            message=f"{t.app_name(body)} removed from the Serve config",
        )
        return
    rs_name = t.rayservice_name(name)
    try:
        if k.delete(RAY_GROUP, RAY_VERSION, RAYSERVICES, namespace, rs_name):
            kopf.info(body, reason="RayServiceDeleted", message=f"RayService {namespace}/{rs_name} deleted")
        if k.get(RAY_GROUP, RAY_VERSION, RAYSERVICES, namespace, rs_name) is not None:
            raise kopf.TemporaryError(f"waiting for RayService {namespace}/{rs_name} to go", delay=1)
    except ApiException as exc:
        raise _retry(exc, "deleting the RayService") from exc


@kopf.timer(GROUP, VERSION, POOLS, interval=10.0, initial_delay=5.0, idle=5.0)
def pool_status_refresh(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Mirror KubeRay's view (Ready, Serve deployment health) into the pool's status, keeping any
    problem condition the last reconcile set."""
    meta = body["metadata"]
    degraded = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Degraded"), None
    )
    if degraded and degraded.get("status") == "True":
        return  # the reconcile's verdict stands until the spec changes
    try:
        target = t.target_of(body, CONFIG.target)
    except ValueError:
        return
    if target == "ray":
        _write_pool_status(patch, ray_pool_status(body))
        return
    ns = meta.get("namespace", "default")
    rs = kube().get(RAY_GROUP, RAY_VERSION, RAYSERVICES, ns, t.rayservice_name(meta["name"]))
    _write_pool_status(patch, pool_status(body, rs))


# ------------------------------------------------------------------------------------------ policies


def _policy_status(
    policy: Mapping[str, Any], problem: tuple[str, str] | None, pool_ready: bool
) -> dict[str, Any]:
    gen = policy["metadata"].get("generation")
    if problem is not None:
        conds = [
            condition("Ready", False, problem[0], problem[1], generation=gen),
            condition("Progressing", False, problem[0], problem[1], generation=gen),
            condition("Degraded", True, problem[0], problem[1], generation=gen),
        ]
    else:
        pool = (policy.get("spec") or {}).get("poolRef")
        msg = f"applied to ModelPool {pool}"
        conds = [
            condition(
                "Ready", pool_ready, "PoolReady" if pool_ready else "PoolNotReady", msg, generation=gen
            ),
            condition("Progressing", not pool_ready, "Applied", msg, generation=gen),
            condition("Degraded", False, "AsExpected", "", generation=gen),
        ]
    old = (policy.get("status") or {}).get("conditions")
    return {"observedGeneration": gen, "conditions": merge_conditions(old, conds)}


def reconcile_policy(
    k: Kube,
    policy: Mapping[str, Any],
    index: Mapping[Any, Any] | None,
    logger: logging.Logger | Any,
    pools: Mapping[Any, Any] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Reconcile the policy's pool; returns (policy status, problem message or None)."""
    meta = policy["metadata"]
    ns = meta.get("namespace", "default")
    pool_name = (policy.get("spec") or {}).get("poolRef")
    pool = _alive(k.get(GROUP, VERSION, POOLS, ns, str(pool_name)))
    if pool is None:
        msg = f"ModelPool {ns}/{pool_name} (spec.poolRef) not found"
        return _policy_status(policy, ("PoolNotFound", msg), False), msg
    status = reconcile_pool(k, pool, index, logger, pools)
    k.patch_status(GROUP, VERSION, POOLS, ns, pool["metadata"]["name"], status)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    return _policy_status(policy, None, ready), None


@kopf.on.create(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
@kopf.on.update(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
@kopf.on.resume(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
def policy_changed(body: kopf.Body, patch: kopf.Patch, logger: Any, **kw: Any) -> None:
    k = kube()
    try:
        status, problem = reconcile_policy(k, body, kw.get("policies_by_pool"), logger, kw.get("all_pools"))
    except ApiException as exc:
        raise _retry(exc, "reconciling the policy's pool") from exc
    for key, value in status.items():
        patch.status[key] = value
    if problem is not None:
        kopf.warn(body, reason="PoolNotFound", message=problem)
        # retried until the pool exists: the policy recovers by itself (the status above is written first)
        raise kopf.TemporaryError(problem, delay=CONFIG.retry_delay_s)
    kopf.info(body, reason="Applied", message=f"applied to ModelPool {body['spec'].get('poolRef')}")


@kopf.timer(GROUP, VERSION, POLICIES, interval=5.0, initial_delay=5.0, idle=5.0)
def policy_status_refresh(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """The policy's Ready / Progressing follow its pool's Ready condition (which the pool's timer keeps
    current), so a policy applied while its pool was still deploying turns Ready with it; a problem the
    last reconcile found (Degraded) stands until the policy changes."""
    conds = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    if not conds or conds.get("Degraded", {}).get("status") == "True":
        return
    ns = body["metadata"].get("namespace", "default")
    pool = _alive(kube().get(GROUP, VERSION, POOLS, ns, str((body.get("spec") or {}).get("poolRef"))))
    if pool is None:
        return
    pool_ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pool.get("status") or {}).get("conditions") or []
    )
    if (conds.get("Ready", {}).get("status") == "True") != pool_ready:
        for key, value in _policy_status(body, None, pool_ready).items():
            patch.status[key] = value


@kopf.on.delete(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
def policy_deleted(body: kopf.Body, logger: Any, **kw: Any) -> None:
    """The pool goes back to the default policy (a serveConfigV2-only change)."""
    k = kube()
    ns = body["metadata"].get("namespace", "default")
    pool = _alive(k.get(GROUP, VERSION, POOLS, ns, str(body["spec"].get("poolRef"))))
    if pool is None:
        return
    try:
        status = reconcile_pool(k, pool, kw.get("policies_by_pool"), logger, kw.get("all_pools"))
        k.patch_status(GROUP, VERSION, POOLS, ns, pool["metadata"]["name"], status)
    except ApiException as exc:
        raise _retry(exc, "reconciling the pool after its policy was deleted") from exc
