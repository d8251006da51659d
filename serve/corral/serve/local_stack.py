"""The local Ray cluster behind ``corral serve`` / ``corral demo``: start, deploy, wait, stop.

:class:`LocalStack` starts a local Ray (small: fractional CPUs per replica, and one custom resource per
GPU class declared on the local node so that the class-pinned engine deployments can be placed), deploys
each ModelPool with its RoutingPolicy as a Serve application (simulated engines + the router) from the
same Serve config ``serve deploy`` / KubeRay would apply, reports replicas coming up, and reads the
router's gRPC and HTTP addresses from the registry (the router opens its own ports). ``stop()`` is
``serve.shutdown()`` + ``ray.shutdown()``.

Replica counts are capped per GPU class (``max_replicas_per_class``, default 2) so an example written for
a GPU cluster fits a laptop, and adapters not fetchable here are replaced by tiny generated ones
(:mod:`corral.serve.local_adapters`); :attr:`LocalStack.notes` says when either happened.

Failures a user can fix are raised as :class:`LocalStackError` with one line naming the cause: a router
port already in use (checked before Ray starts), a Serve application that failed to deploy (the
exception line from Serve's message, not the whole traceback), replicas that never became ready.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .app import PoolPlan, ServeOptions, plan_pool
from .app import serve_config as make_serve_config
from .local_adapters import localize_adapters


class LocalStackError(RuntimeError):
    """The local stack cannot start; the message is one line a user can act on."""


def check_port_free(host: str, port: int, what: str = "port") -> None:
    """Raise :class:`LocalStackError` if ``host:port`` cannot be bound (0 = any free port: no check)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            reason = "in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
            raise LocalStackError(
                f"{what} {host}:{port} is not available ({reason}); pick another or pass 0 for a free one"
            ) from None


_EXC_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")


def failure_cause(message: str) -> str:
    """The last exception line of a Serve failure message (``ValueError: ...``), else its last line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _EXC_LINE.match(ln)
        if m:
            return f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
    return lines[-1] if lines else "unknown error"


@dataclass(slots=True)
class LocalOptions:
    max_replicas_per_class: int | None = 2
    router_replicas: int = 1
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    num_cpus: int | None = None
    engine: str | None = None  # override every model's engine (default: sim, as local mode has no GPU)
    sim_time_scale: float = 1.0
    adapter_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "corral" / "local-adapters")
    namespace: str = "corral"
    api_keys_file: str | None = None  # tenant API key file (digests) for a RoutingPolicy with tenants
    router_tls_dir: str | None = None  # ServeOptions' TLS fields (corral serve --tls-dir ...)
    router_client_auth: bool = False
    engine_tls_dir: str | None = None


def _sim_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("corral.serve.endpoint.sim") is not None and (
            importlib.util.find_spec("corral.serve.sim") is not None
        )
    except ImportError:
        return False


@dataclass(slots=True)
class RouterAddress:
    router_id: str
    grpc: str
    http: str


class LocalStack:
    """One local Ray + Serve running the given pools. Not re-entrant: one per process."""

    def __init__(
        self,
        pairs: Sequence[tuple[dict[str, Any], dict[str, Any] | None]],
        options: LocalOptions | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.options = opts = options or LocalOptions()
        self.log = log
        engine = opts.engine
        if engine is None:
            engine = "sim" if _sim_available() else "echo"
            if engine == "echo":
                log("note: the simulated engine is not available in this build; using the echo engine")
        self.notes: list[str] = []
        self.plans: list[PoolPlan] = []
        for pool, policy in pairs:
            replaced = localize_adapters(pool, opts.adapter_cache)
            if replaced:
                self.notes.append(
                    f"{len(replaced)} adapter source(s) of pool {pool['metadata']['name']} are not fetchable "
                    f"here; using generated tiny adapters under {opts.adapter_cache}"
                )
            sopts = ServeOptions(
                namespace=opts.namespace,
                router_replicas=opts.router_replicas,
                router_host=opts.host,
                router_grpc_port=opts.grpc_port,
                router_http_port=opts.http_port,
                router_num_cpus=0.2,
                engine_num_cpus=0.1,
                max_replicas_per_class=opts.max_replicas_per_class,
                health_check_period_s=2.0,
                health_check_timeout_s=10.0,
                sim_time_scale=opts.sim_time_scale,
                heartbeat_s=1.0,
                advertise_host="127.0.0.1",
                engine_override=engine,
                api_keys_file=opts.api_keys_file,
                router_tls_dir=opts.router_tls_dir,
                router_client_auth=opts.router_client_auth,
                engine_tls_dir=opts.engine_tls_dir,
            )
            plan = plan_pool(pool, policy, sopts)
            self.plans.append(plan)
            for e in plan.engines:
                if e.scaled_down_from is not None:
                    self.notes.append(
                        f"{e.name}: {e.num_replicas} replica(s) instead of {e.scaled_down_from} "
                        f"(local mode caps replicas per GPU class; --max-replicas-per-class)"
                    )
        self.started = False

    # -- resources --
    def resources(self) -> dict[str, float]:
        """Custom GPU-class resources the local node must declare to place every engine replica."""
        res: dict[str, float] = {}
        for plan in self.plans:
            for e in plan.engines:
                for k, v in e.ray_actor_options.get("resources", {}).items():
                    res[k] = res.get(k, 0.0) + float(v) * e.num_replicas
        return res

    def expected_engines(self) -> int:
        return sum(e.num_replicas for p in self.plans for e in p.engines)

    # -- lifecycle --
    def start(
        self, progress: Callable[[dict[str, tuple[int, int]]], None] | None = None, timeout_s: float = 300
    ) -> None:
        """Start Ray and Serve, deploy every pool, wait until all replicas run and routers see them."""
        import logging

        o = self.options
        check_port_free(o.host, o.grpc_port, "router gRPC port")
        check_port_free(o.host, o.http_port, "router HTTP port")

        import ray
        from ray import serve

        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        ray.init(
            num_cpus=self.options.num_cpus or max(2, os.cpu_count() or 2),
            resources=self.resources(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace=self.options.namespace,
        )
        self.started = True
        serve.start(proxy_location="Disabled")
        self.deploy()
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.replica_progress()
            if progress is not None:
                progress(state)
            failed = self.failed_apps()
            if failed:
                raise LocalStackError(
                    "deployment failed: " + "; ".join(failed) + " (Ray's logs: /tmp/ray/session_latest/logs)"
                )
            if all(r >= w for r, w in state.values()) and self._routers_ready():
                break
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{k} {r}/{w}" for k, (r, w) in state.items() if r < w) or "routers"
                why = "; ".join(self.failed_apps(waiting_too=True))
                raise LocalStackError(
                    f"replicas not ready after {timeout_s:.0f}s: {waiting}" + (f" ({why})" if why else "")
                )
            time.sleep(0.3)
        if progress is not None:
            progress(self.replica_progress())

    def serve_config(self) -> dict[str, Any]:
        return make_serve_config(self.plans, proxy_location="Disabled")

    def deploy(self) -> None:
        """Apply the pools' Serve config declaratively, as ``serve deploy`` / KubeRay do (the same
        builder, ``args`` and per-deployment overrides); an unchanged deployment is left running."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        client = _get_global_client()
        assert client is not None, "Serve is not started"
        client.deploy_apps(ServeDeploySchema.model_validate(self.serve_config()))

    def update_policy(self, policy: dict[str, Any], pool_id: str | None = None) -> None:
        """Apply a changed RoutingPolicy live: only the routers' ``user_config`` changes (reconfigure)."""
        i = next((k for k, p in enumerate(self.plans) if pool_id in (None, p.pool_id)), None)
        if i is None:
            raise KeyError(f"no pool {pool_id!r}")
        old = self.plans[i]
        self.plans[i] = plan_pool(old.pool, policy, old.options)
        self.deploy()

    def failed_apps(self, waiting_too: bool = False) -> list[str]:
        """One ``name: cause`` line per failed application or deployment (the exception line of Serve's
        message); with ``waiting_too``, also the deployments that are not running yet and say why."""
        from ray import serve

        try:
            st = serve.status()
        except Exception:
            return []
        out = []
        for plan in self.plans:
            app = st.applications.get(plan.app_name)
            if app is None:
                continue
            if str(app.status).endswith("DEPLOY_FAILED"):
                out.append(f"{plan.app_name}: {failure_cause(app.message)}")
                continue
            for name, dep in app.deployments.items():
                status = str(dep.status).rsplit(".", 1)[-1]
                failed = status in ("DEPLOY_FAILED", "UNHEALTHY")
                if dep.message and (failed or (waiting_too and status != "HEALTHY")):
                    out.append(f"{plan.app_name}/{name}: {failure_cause(dep.message)}")
        return out

    def replica_progress(self) -> dict[str, tuple[int, int]]:
        """deployment -> (running replicas, target), over every pool."""
        from ray import serve

        out: dict[str, tuple[int, int]] = {}
        try:
            st = serve.status()
        except Exception:
            st = None
        for plan in self.plans:
            app = st.applications.get(plan.app_name) if st is not None else None
            for name, target in [(e.name, e.num_replicas) for e in plan.engines] + [
                (plan.router.name, plan.router.num_replicas)
            ]:
                running = 0
                if app is not None and name in app.deployments:
                    states: dict[Any, int] = dict(app.deployments[name].replica_states)
                    running = int(states.get("RUNNING", 0))
                out[f"{plan.pool_id}/{name}"] = (running, target)
        return out

    def _registry(self) -> Any:
        from .registry import get_registry

        return get_registry(self.options.namespace)

    def routers(self, pool_id: str | None = None) -> list[RouterAddress]:
        import ray

        reg = self._registry()
        pid = pool_id or self.plans[0].pool_id
        recs = ray.get(reg.list_routers.remote(pid), timeout=10)
        return [RouterAddress(r["router_id"], r["grpc"], r["http"]) for r in recs]

    def _routers_ready(self) -> bool:
        """Every pool has its routers registered, each seeing every engine replica of the pool."""
        import urllib.request

        import orjson

        for plan in self.plans:
            rs = self.routers(plan.pool_id)
            if len(rs) < plan.router.num_replicas:
                return False
            want = sum(e.num_replicas for e in plan.engines)
            for r in rs:
                try:
                    with urllib.request.urlopen(r.http + "/health", timeout=2) as resp:
                        if int(orjson.loads(resp.read()).get("replicas", 0)) < want:
                            return False
                except Exception:
                    return False
        return True

    def stop(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        # Serve's own shutdown kills its controller while a retried call to it is pending, and Ray then
        # prints a harmless "actor is dead" line from the raylet; keep the terminal clean.
        with _quiet_output():
            with contextlib.suppress(Exception):
                serve.shutdown()
            with contextlib.suppress(Exception):
                ray.shutdown()
        self.started = False


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Silence fds 1 and 2 (Ray's background log printers write there directly)."""
    import sys

    try:
        fds = [sys.stdout.fileno(), sys.stderr.fileno()]
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as null:
            for fd in fds:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, keep in zip(fds, saved, strict=True):
            os.dup2(keep, fd)
            os.close(keep)
