"""The Serve application builder: a :class:`~corral.serve.app.PoolPlan` bound into Serve deployments.

``import_path: corral.serve.application:build_app`` in a Serve config (what ``serveConfigV2`` and the
dashboard REST API deploy) names :func:`build_app`; :func:`build_application` gives the same
``Application`` for ``serve.run``. This module joins the pure translation (:mod:`corral.serve.app`) and the
deployment classes (:mod:`corral.serve.deployments`), so neither imports the other's side.
"""

from __future__ import annotations

from typing import Any

from . import deployments
from .app import PoolPlan, plan_pool


def build_application(plan: PoolPlan) -> Any:
    """The Serve ``Application`` of a plan: engine deployments bound into the router (the ingress)."""
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
    and the engines' ``blockSize``; the config's per-deployment ``user_config`` carries the policy)."""
    return build_application(
        plan_pool(args["pool"], None, args.get("options"), block_size=args.get("blockSize"))
    )
