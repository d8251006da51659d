"""Local mode: ``corral serve -f manifests/examples/`` and ``corral demo`` on one machine, no Kubernetes.

:class:`LocalStack` starts a local Ray (small: fractional CPUs per replica, and one custom resource per
GPU class declared on the local node so that the class-pinned engine deployments can be placed), deploys
each ModelPool with its RoutingPolicy as a Serve application (simulated engines + the router), shows
replicas coming up, and reports the router's gRPC and HTTP addresses (read from the registry, since the
router opens its own ports). ``stop()`` is ``serve.shutdown()`` + ``ray.shutdown()``.

Replica counts are capped per GPU class (``--max-replicas-per-class``, default 2) so an example written
for a GPU cluster fits a laptop; the output says when it did. Adapters whose source cannot be fetched
here (``s3://``, ``hf://`` or a missing ``file://`` path) are replaced by tiny generated safetensors
adapters of the same rank, and the output says so.

:func:`run_demo` sends a short, realistic workload through the OpenAI HTTP API — shared system prompts,
multi-turn conversations, LoRA adapters with skewed popularity — and prints a live table (requests, prefix
hit rate, adapter loads, TTFT percentiles, requests per replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .app import PoolPlan, ServeOptions, plan_pool
from .app import serve_config as make_serve_config

# ---- manifests ---------------------------------------------------------------------------------------


def _docs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml", ".json"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    docs: list[dict[str, Any]] = []
    for f in files:
        for d in yaml.safe_load_all(f.read_text()):
            if isinstance(d, dict) and d.get("kind") in ("ModelPool", "RoutingPolicy"):
                docs.append(d)
    return docs


def _validated(doc: dict[str, Any]) -> dict[str, Any]:
    """Validate with the API models when available (same rules as ``corral validate``)."""
    try:
        from corral.api import models
    except ImportError:  # pragma: no cover - the api package ships with corral
        return doc
    cls = models.ModelPool if doc["kind"] == "ModelPool" else models.RoutingPolicy
    obj = cls.model_validate(doc)
    return obj.model_dump(by_alias=True, mode="json", exclude_none=True)


def load_manifests(paths: Iterable[str | Path]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(ModelPool, its RoutingPolicy or None) pairs from YAML files or folders."""
    docs = [_validated(d) for d in _docs(paths)]
    pools = [d for d in docs if d["kind"] == "ModelPool"]
    policies = [d for d in docs if d["kind"] == "RoutingPolicy"]
    if not pools:
        raise ValueError("no ModelPool found in the given manifests")
    out = []
    for p in pools:
        name = p["metadata"]["name"]
        ref = (p.get("spec") or {}).get("routingPolicyRef")
        match = [
            r
            for r in policies
            if (r.get("spec") or {}).get("poolRef") == name or (ref and r["metadata"]["name"] == ref)
        ]
        out.append((p, match[0] if match else None))
    return out


def _fetchable(uri: str) -> bool:
    from corral.router.paging import AdapterSourceError, parse_source

    try:
        src = parse_source(uri)
    except AdapterSourceError:
        return False
    return src.scheme == "file" and Path(src.location).exists()


def make_tiny_adapter(dest: Path, rank: int = 8, hidden: int = 64) -> Path:
    """A tiny but well-formed PEFT-style LoRA adapter (safetensors + adapter_config.json)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    w = dest / "adapter_model.safetensors"
    if not w.exists():
        rng = np.random.default_rng(zlib.crc32(dest.name.encode()))
        tensors = {}
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.0.self_attn.{proj}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((rank, hidden), np.float32) * 0.01
            tensors[f"{pre}.lora_B.weight"] = np.zeros((hidden, rank), np.float32)
        save_file(tensors, str(w))
        cfg = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def localize_adapters(pool: dict[str, Any], cache_dir: Path) -> list[str]:
    """Point adapters whose source is not fetchable here at generated tiny adapters; returns their names."""
    replaced = []
    for a in (pool.get("spec") or {}).get("adapters") or []:
        if not _fetchable(a.get("source", "")):
            rank = int(a.get("rank") or 8)
            d = make_tiny_adapter(cache_dir / f"{a['name']}-r{rank}", rank=min(rank, 64))
            a["source"] = d.resolve().as_uri()
            replaced.append(a["name"])
    return replaced


# ---- the stack ---------------------------------------------------------------------------------------


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
    ):
        """Start Ray and Serve, deploy every pool, wait until all replicas run and routers see them."""
        import logging

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
                raise RuntimeError("deployment failed: " + "; ".join(failed))
            if all(r >= w for r, w in state.values()) and self._routers_ready():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas not ready after {timeout_s:.0f}s: {state}")
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

    def failed_apps(self) -> list[str]:
        from ray import serve

        try:
            st = serve.status()
        except Exception:
            return []
        out = []
        for plan in self.plans:
            app = st.applications.get(plan.app_name)
            if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
                out.append(f"{plan.app_name}: {app.message[-2000:]}")
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


# ---- CLI entry points --------------------------------------------------------------------------------


def _progress_printer(console: Any) -> tuple[Any, Callable[[dict[str, tuple[int, int]]], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    prog = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(state: dict[str, tuple[int, int]]) -> None:
        for name, (running, target) in state.items():
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=target)
            prog.update(tasks[name], completed=min(running, target), total=target)

    return prog, update


def start_stack(paths: Sequence[str], options: LocalOptions, console: Any) -> LocalStack:
    pairs = load_manifests(paths)
    stack = LocalStack(pairs, options, log=console.print)
    for plan in stack.plans:
        console.print(f"[bold]pool {plan.pool_id}[/]: " + "; ".join(plan.summary()))
    for n in stack.notes:
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"starting a local Ray cluster (GPU-class resources: {stack.resources()})")
    prog, update = _progress_printer(console)
    try:
        with prog:
            stack.start(update)
    except BaseException:
        stack.stop()
        raise
    return stack


def print_addresses(stack: LocalStack, console: Any) -> list[RouterAddress]:
    out = []
    for plan in stack.plans:
        for r in stack.routers(plan.pool_id):
            console.print(f"[green]ready[/] pool [bold]{plan.pool_id}[/] router {r.router_id}")
            console.print(f"  HTTP (OpenAI): [bold]{r.http}[/]   e.g. curl {r.http}/v1/models")
            console.print(f"  gRPC:          [bold]{r.grpc}[/]   (corral.v1.Router)")
            out.append(r)
    return out


def serve_main(paths: Sequence[str], options: LocalOptions) -> int:
    """``corral serve``: run until Ctrl-C."""
    from rich.console import Console

    console = Console()
    stack = start_stack(paths, options, console)
    try:
        print_addresses(stack, console)
        console.print("serving; press Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()
    return 0


# ---- demo workload -----------------------------------------------------------------------------------

_TOPICS = [
    "You are a support assistant for an online bookshop. Answer politely, cite order numbers, and never "
    "promise refunds without checking the return policy first.",
    "You are a senior SQL reviewer. Explain query plans, point out missing indexes and rewrite queries "
    "for PostgreSQL, keeping answers short and precise.",
    "You are a travel planner. Suggest itineraries with train connections, budget estimates and local "
    "food, and ask about accessibility needs before booking anything.",
]
_QUESTIONS = [
    "what can you help me with today",
    "give me a short example please",
    "can you explain that in more detail",
    "what are the trade offs here",
    "summarise the previous answer in one line",
]


@dataclass(slots=True)
class DemoStats:
    sent: int = 0
    done: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    per_replica: Counter[str] = field(default_factory=Counter)
    adapter_requests: int = 0
    adapter_loads: float = 0.0  # into GPU slots, as the engines reported them
    adapter_prefetches: float = 0.0  # into host memory (paging manager prefetch)
    last_error: str = ""

    def pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        s = sorted(self.ttft)
        return s[min(len(s) - 1, int(q * len(s)))]


def _table(stats: DemoStats, total: int, elapsed: float) -> Any:
    from rich.table import Table

    t = Table(title=f"corral demo — {elapsed:5.1f}s", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests done / total", f"{stats.done} / {total}")
    t.add_row("errors", str(stats.errors))
    hit = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    t.add_row("prefix cache hit rate (tokens)", f"{hit:6.1%}")
    t.add_row("adapter requests", str(stats.adapter_requests))
    t.add_row(
        "adapter loads to GPU / prefetches to CPU",
        f"{stats.adapter_loads:.0f} / {stats.adapter_prefetches:.0f}",
    )
    t.add_row("TTFT p50 / p90", f"{stats.pct(0.5) * 1e3:6.1f} / {stats.pct(0.9) * 1e3:6.1f} ms")
    t.add_row("throughput", f"{stats.done / elapsed:5.1f} req/s" if elapsed > 0 else "-")
    for rid, n in sorted(stats.per_replica.items()):
        t.add_row(f"  on {rid}", str(n))
    return t


async def _scrape_adapter_loads(session: Any, url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    gpu = cpu = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("corral_adapter_loads"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    if s.labels.get("tier") == "cpu":
                        cpu += s.value
                    else:
                        gpu += s.value
    return gpu, cpu


async def demo_workload(
    http_url: str,
    models: Sequence[str],
    adapters: Sequence[str],
    *,
    conversations: int = 24,
    turns: int = 4,
    concurrency: int = 6,
    max_tokens: int = 24,
    seed: int = 7,
    on_update: Callable[[DemoStats], None] | None = None,
) -> DemoStats:
    """Multi-turn conversations over shared system prompts; a third of them use a LoRA adapter (Zipf)."""
    import aiohttp
    import orjson

    rng = random.Random(seed)
    stats = DemoStats()
    zipf = [1.0 / (i + 1) for i in range(len(adapters))]
    convs = []
    for c in range(conversations):
        system = _TOPICS[c % len(_TOPICS)] * 6
        use_adapter = adapters and rng.random() < 0.35
        model = rng.choices(list(adapters), zipf)[0] if use_adapter else models[c % len(models)]
        convs.append((c, system, model))
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def conversation(c: int, system: str, model: str) -> None:
            history = f"system: {system}\n"
            for turn in range(turns):
                history += f"user {c}: {_QUESTIONS[(c + turn) % len(_QUESTIONS)]}\n"
                body = {
                    "model": model,
                    "prompt": history + "assistant:",
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with sem:
                    stats.sent += 1
                    t0 = time.perf_counter()
                    first = None
                    text = ""
                    try:
                        async with session.post(http_url + "/v1/completions", json=body) as r:
                            if r.status != 200:
                                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                            replica = r.headers.get("x-corral-replica", "?")
                            async for raw in r.content:
                                line = raw.strip()
                                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                    continue
                                ev = orjson.loads(line[6:])
                                if "error" in ev:
                                    raise RuntimeError(str(ev["error"])[:200])
                                if first is None and ev.get("choices"):
                                    first = time.perf_counter() - t0
                                for ch in ev.get("choices") or []:
                                    text += ch.get("text") or ""
                                u = ev.get("usage")
                                if u:
                                    stats.prompt_tokens += int(u.get("prompt_tokens", 0))
                                    details = u.get("prompt_tokens_details") or {}
                                    stats.cached_tokens += int(details.get("cached_tokens", 0) or 0)
                        stats.done += 1
                        stats.ttft.append(first if first is not None else time.perf_counter() - t0)
                        stats.per_replica[replica] += 1
                        if model in adapters:
                            stats.adapter_requests += 1
                    except Exception as e:
                        stats.errors += 1
                        stats.last_error = str(e)
                history += f"assistant: {text.strip()[:200]}\n"
                if on_update is not None:
                    on_update(stats)

        async def scraper() -> None:
            while True:
                with contextlib.suppress(Exception):
                    stats.adapter_loads, stats.adapter_prefetches = await _scrape_adapter_loads(
                        session, http_url
                    )
                if on_update is not None:
                    on_update(stats)
                await asyncio.sleep(0.5)

        scrape = asyncio.create_task(scraper())
        try:
            await asyncio.gather(*(conversation(*cv) for cv in convs))
        finally:
            scrape.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scrape
            with contextlib.suppress(Exception):
                stats.adapter_loads, stats.adapter_prefetches = await _scrape_adapter_loads(session, http_url)
    return stats


def demo_main(paths: Sequence[str], options: LocalOptions, conversations: int = 40, turns: int = 5) -> int:
    """``corral demo``: start the stack, run the workload with a live table, stop; exit 0 on success."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    stack = start_stack(paths, options, console)
    try:
        routers = print_addresses(stack, console)
        plan = stack.plans[0]
        models = [m["name"] for m in plan.router.init_kwargs["models"]]
        adapters = [a["name"] for a in plan.router.user_config["adapters"]]
        total = conversations * turns
        console.print(
            f"sending {total} requests: {conversations} conversations x {turns} turns over "
            f"{len(_TOPICS)} shared system prompts, models {', '.join(models)}, {len(adapters)} adapters"
        )
        t0 = time.monotonic()
        with Live(_table(DemoStats(), total, 0.0), console=console, refresh_per_second=4) as live:

            def update(s: DemoStats) -> None:
                live.update(_table(s, total, time.monotonic() - t0))

            stats = asyncio.run(
                demo_workload(routers[0].http, models, adapters, conversations=conversations, turns=turns,
                              on_update=update)
            )  # fmt: skip
            update(stats)
        if stats.errors:
            console.print(f"[red]{stats.errors} request(s) failed[/]; last error: {stats.last_error}")
        ok = stats.done > 0 and stats.errors <= max(1, total // 50)
        console.print()
        console.print("[green]demo finished[/]" if ok else "[red]demo failed[/]")
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        console.print("stopping the local cluster…")
        stack.stop()
