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
  by itself when the pool appears.
* a timer refreshes each pool's status from its RayService (KubeRay's Ready condition, Serve deployment
  health).

Target ``ray`` (an existing Ray cluster through the dashboard's Serve REST API) is translated
(:func:`corral.operator.translate.serve_rest_config`) but not deployed by these handlers yet: such a pool
is Degraded with reason ``TargetNotSupported``.
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
    rayservice: t.RayServiceOptions = field(default_factory=t.RayServiceOptions)
    retry_delay_s: float = 5.0


CONFIG = OperatorConfig()
"""Set by ``corral operator run`` before kopf starts (module state: kopf handlers are module functions)."""

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
    kube()


# ------------------------------------------------------------------------------------------ lookup


@kopf.index(GROUP, VERSION, POLICIES)
def policies_by_pool(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[Any, str]:
    """(namespace, poolRef) -> names of the RoutingPolicies that route it."""
    return {(namespace, spec.get("poolRef")): name}


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
) -> dict[str, Any]:
    """The ModelPool's status from its spec, its RayService and a problem ``(reason, message)``."""
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
        rs_name = (rs or {}).get("metadata", {}).get("name", "")
        msg = f"RayService {rs_name}: {reason}" + (f": {message}" if message else "")
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
    k: Kube, pool: Mapping[str, Any], index: Mapping[Any, Any] | None, logger: logging.Logger | Any
) -> dict[str, Any]:
    """Make the pool's RayService match the CRs; returns the pool's new status (the caller writes it)."""
    meta = pool["metadata"]
    ns = meta.get("namespace", "default")
    try:
        target = t.target_of(pool, CONFIG.target)
    except ValueError as exc:
        kopf.warn(_body(pool), reason="InvalidTarget", message=str(exc))
        return pool_status(pool, None, problem=("InvalidTarget", str(exc)))
    if target != "rayservice":
        msg = f"target {target!r} is not deployed by the operator yet (only 'rayservice')"
        kopf.warn(_body(pool), reason="TargetNotSupported", message=msg)
        return pool_status(pool, None, problem=("TargetNotSupported", msg))

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
        status = reconcile_pool(kube(), body, kw.get("policies_by_pool"), logger)
    except ApiException as exc:
        raise _retry(exc, "reconciling the RayService") from exc
    _write_pool_status(patch, status)


@kopf.on.delete(GROUP, VERSION, POOLS, backoff=BACKOFF_S)
def pool_deleted(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
    k = kube()
    namespace = namespace or "default"
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
    k: Kube, policy: Mapping[str, Any], index: Mapping[Any, Any] | None, logger: logging.Logger | Any
) -> tuple[dict[str, Any], str | None]:
    """Reconcile the policy's pool; returns (policy status, problem message or None)."""
    meta = policy["metadata"]
    ns = meta.get("namespace", "default")
    pool_name = (policy.get("spec") or {}).get("poolRef")
    pool = _alive(k.get(GROUP, VERSION, POOLS, ns, str(pool_name)))
    if pool is None:
        msg = f"ModelPool {ns}/{pool_name} (spec.poolRef) not found"
        return _policy_status(policy, ("PoolNotFound", msg), False), msg
    status = reconcile_pool(k, pool, index, logger)
    k.patch_status(GROUP, VERSION, POOLS, ns, pool["metadata"]["name"], status)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    return _policy_status(policy, None, ready), None


@kopf.on.create(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
@kopf.on.update(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
@kopf.on.resume(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
def policy_changed(body: kopf.Body, patch: kopf.Patch, logger: Any, **kw: Any) -> None:
    k = kube()
    try:
        status, problem = reconcile_policy(k, body, kw.get("policies_by_pool"), logger)
    except ApiException as exc:
        raise _retry(exc, "reconciling the policy's pool") from exc
    for key, value in status.items():
        patch.status[key] = value
    if problem is not None:
        kopf.warn(body, reason="PoolNotFound", message=problem)
        # retried until the pool exists: the policy recovers by itself (the status above is written first)
        raise kopf.TemporaryError(problem, delay=CONFIG.retry_delay_s)
    kopf.info(body, reason="Applied", message=f"applied to ModelPool {body['spec'].get('poolRef')}")


@kopf.on.delete(GROUP, VERSION, POLICIES, backoff=BACKOFF_S)
def policy_deleted(body: kopf.Body, logger: Any, **kw: Any) -> None:
    """The pool goes back to the default policy (a serveConfigV2-only change)."""
    k = kube()
    ns = body["metadata"].get("namespace", "default")
    pool = _alive(k.get(GROUP, VERSION, POOLS, ns, str(body["spec"].get("poolRef"))))
    if pool is None:
        return
    try:
        status = reconcile_pool(k, pool, kw.get("policies_by_pool"), logger)
        k.patch_status(GROUP, VERSION, POOLS, ns, pool["metadata"]["name"], status)
    except ApiException as exc:
        raise _retry(exc, "reconciling the pool after its policy was deleted") from exc
