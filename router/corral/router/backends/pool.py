"""``BackendPool``: the router's fleet state kept in sync with OpenAI-compatible HTTP backends.

The counterpart of :class:`~corral.router.engine_client.EnginePool` (same interface for
:class:`~corral.router.server.core.Router`: ``by_replica[id].stub.Generate``, ``quarantine``,
``adapter_catalog``, ``wait_for_replicas``, ``set_profiles``) for servers that publish no event stream, such
as vLLM's and SGLang's OpenAI servers. Per backend URL (from a discovery source), one probe loop:

- every ``scrape_interval_s``: ``GET /metrics`` -> the replica's load sample (running, waiting, KV usage),
  stamped with the router's clock *when the scrape was sent* (its age counts the scrape's round trip). It is
  a :class:`~.load.ScrapedLoad`: this router's own live counts plus the load it did not send, which fades
  with the sample's age and is ignored after ``sample_max_age_s`` (see :mod:`.load`);
- every ``health_every`` scrapes, and always while the backend is out: ``GET /health`` and
  ``GET /v1/models`` (base model, max length, loaded LoRA adapters = GPU-resident for the cost model);
- ``fail_threshold`` consecutive failures (refused, timed out, non-2xx) eject the backend from routing
  (its replica and prefix index are dropped); the first full success re-admits it with an empty index.

Prefix index: the router's own dispatch history (RoutingPolicy ``prefixIndex: approximate``), LRU-bounded
by the backend's KV capacity (``vllm:cache_config_info``: ``num_gpu_blocks`` x ``block_size``, else the GPU
class's profile); with ``kv_events_port``, vLLM's ZMQ KV-event publisher on each backend's host feeds it too
(:mod:`.kv_events`), which makes ``prefixIndex: precise`` possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..core import SAMPLE_MAX_AGE_S
from ..engine_client import Discovery
from ..events import AdapterLoaded, EngineEvent
from ..hashing import DEFAULT_BLOCK_SIZE
from ..replica_pool import ReplicaPool
from ..state import FleetState
from ..wire import EngineInfo
from .load import ScrapedLoad
from .openai_http import OpenAIStub
from .scrape import ModelList, Scraped, parse_metrics, parse_models

log = logging.getLogger(__name__)


def _default_profile(name: str) -> Any:
    from corral.api.profiles import resolve_profile

    return resolve_profile(name)


class ProbeFailed(Exception):
    """A backend's probe failed (the message says which request and why)."""


@dataclass(eq=False)
class Backend:
    """One OpenAI-compatible server as seen by this router."""

    url: str
    gpu_class: str
    stub: OpenAIStub
    replica_id: str
    info: EngineInfo | None = None
    connected: bool = False
    adapters: dict[str, str] = field(default_factory=dict)  # name -> tier ("gpu": loaded)
    sources: dict[str, str] = field(default_factory=dict)  # name -> where it was loaded from
    failures: int = 0
    last_error: str = ""
    has_metrics: bool = True
    task: asyncio.Task[None] | None = None
    quarantined_until: float = 0.0
    kv: Any = None  # the KvEventSubscriber, when KV events are read
    kv_task: asyncio.Task[None] | None = None


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (the backend wants an API key: corral router --backend-api-key-file FILE)"
    return ""


def split_spec(spec: str, default_class: str) -> tuple[str, str]:
    """``[CLASS=]URL`` -> (GPU class, URL)."""
    cls, sep, url = spec.partition("=")
    if not sep or "://" in cls:
        return default_class, spec.rstrip("/")
    return cls, url.rstrip("/")


def replica_id_of(url: str) -> str:
    """A backend's replica id: its ``host:port``."""
    u = urlsplit(url)
    return u.netloc or url


class BackendPool(ReplicaPool[Backend]):
    """Keeps a :class:`FleetState` in sync with OpenAI-compatible backends (see the module docstring)."""

    def __init__(
        self,
        fleet: FleetState,
        discovery: Discovery,
        *,
        router_id: str = "router",
        stale_after_s: float = 1.0,  # unused here: a backend is judged by its probes (fail_threshold)
        on_event: Callable[[str, EngineEvent], None] | None = None,
        on_membership: Callable[[str, bool], None] | None = None,
        gpu_class: str = "H100",
        block_size: int = DEFAULT_BLOCK_SIZE,
        scrape_interval_s: float = 0.25,
        health_every: int = 4,
        fail_threshold: int = 2,
        probe_timeout_s: float = 1.0,
        resolve_profile: Callable[[str], Any] = _default_profile,
        profiles: Mapping[str, Any] | None = None,
        max_connections: int = 0,
        sample_max_age_s: float = SAMPLE_MAX_AGE_S,
        kv_events_port: int | None = None,
        kv_events_topic: str = "",
        api_key: str | None = None,
        declared_models: Collection[str] = (),
    ) -> None:
        self.fleet = fleet
        self.declared_models = frozenset(declared_models)  # the policy's ModelPool models (none: any)
        self._warned_models: set[str] = set()
        self.discovery = discovery
        self.router_id = router_id
        self.on_event = on_event
        self.on_membership = on_membership
        self.gpu_class = gpu_class
        self.block_size = block_size
        self.scrape_interval_s = scrape_interval_s
        self.health_every = max(1, health_every)
        self.fail_threshold = max(1, fail_threshold)
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self.resolve_profile = resolve_profile
        self.profiles: dict[str, Any] = dict(profiles or {})
        self.max_connections = max_connections
        self.sample_max_age_s = sample_max_age_s
        self.kv_events_port = kv_events_port
        self.kv_events_topic = kv_events_topic
        self.api_key = api_key  # sent as 'Authorization: Bearer' to every backend (vLLM --api-key)
        self.conns: dict[str, Backend] = {}  # discovery spec -> backend
        self.by_replica: dict[str, Backend] = {}  # replica id -> backend (admitted ones)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._closed = False

    # ---- lifecycle ------------------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            conn = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30)
            auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            self._session = aiohttp.ClientSession(connector=conn, headers=auth)
        return self._session

    async def start(self) -> None:
        self.session()
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="corral-backend-discovery"))

    async def stop(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for b in list(self.conns.values()):
            await self._drop(b)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.discovery.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh(self) -> None:
        """Poll discovery once: start probing new backends, drop vanished ones."""
        try:
            specs = set(await self.discovery.endpoints())
        except Exception as e:  # a flaky discovery source must not kill routing
            log.warning("backend discovery failed: %s", e)
            return
        for s in specs - self.conns.keys():
            self._add(s)
        for s in self.conns.keys() - specs:
            await self._drop(self.conns[s])

    def _add(self, spec: str) -> None:
        cls, url = split_spec(spec, self.gpu_class)
        rid = replica_id_of(url)
        b = Backend(url=url, gpu_class=cls, stub=None, replica_id=rid)  # type: ignore[arg-type]
        b.stub = OpenAIStub(url, self.session, lambda name: name in b.adapters,
                            lambda name, src: self._adapter_loaded(b, name, src),
                            on_lost=lambda name: self._adapter_lost(b, name))  # fmt: skip
        self.conns[spec] = b
        b.task = asyncio.create_task(self._run(b), name=f"corral-backend-{rid}")

    async def _drop(self, b: Backend) -> None:
        for spec, x in list(self.conns.items()):
            if x is b:
                del self.conns[spec]
        if b.task is not None:
            b.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await b.task
        self._eject(b, "dropped by discovery")

    # ---- probes -----------------------------------------------------------------------------------------
    async def _get(self, b: Backend, path: str) -> aiohttp.ClientResponse:
        try:
            r = await self.session().get(f"{b.url}{path}", timeout=self.probe_timeout)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProbeFailed(f"GET {path}: {type(e).__name__}: {e}") from None
        return r

    async def _json(self, b: Backend, path: str) -> Any:
        r = await self._get(b, path)
        async with r:
            if r.status != 200:
                raise ProbeFailed(f"GET {path}: HTTP {r.status}{_hint(r.status)}")
            try:
                return await r.json(content_type=None)
            except (ValueError, aiohttp.ClientError, TimeoutError) as e:
                raise ProbeFailed(f"GET {path}: {e}") from None

    async def _health(self, b: Backend) -> ModelList:
        r = await self._get(b, "/health")
        async with r:
            if r.status != 200:
                raise ProbeFailed(f"GET /health: HTTP {r.status}{_hint(r.status)}")
        try:
            return parse_models(await self._json(b, "/v1/models"))
        except ValueError as e:
            raise ProbeFailed(f"GET /v1/models: {e}") from None

    async def _metrics(self, b: Backend) -> Scraped | None:
        if not b.has_metrics:
            return None
        r = await self._get(b, "/metrics")
        async with r:
            if r.status == 404:
                log.warning("backend %s has no /metrics: load comes from the router's own counts", b.url)
                b.has_metrics = False
                return None
            if r.status != 200:
                raise ProbeFailed(f"GET /metrics: HTTP {r.status}")
            try:
                text = await r.text()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise ProbeFailed(f"GET /metrics: {e}") from None
        try:
            return parse_metrics(text)
        except ValueError as e:
            raise ProbeFailed(f"GET /metrics: unparsable: {e}") from None

    async def _run(self, b: Backend) -> None:
        tick = 0
        while not self._closed:
            full = not b.connected or tick % self.health_every == 0
            tick += 1
            sent = self._now()
            r0 = self.fleet.replicas.get(b.replica_id)
            own = len(r0.in_flight) if r0 is not None else 0
            try:
                models = await self._health(b) if full else None
                scraped = await self._metrics(b)
            except ProbeFailed as e:
                self._failed(b, str(e))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not stop probing
                log.exception("probing backend %s", b.url)
                self._failed(b, repr(e))
            else:
                if full:  # only a full probe (health + models) clears failures; a scrape alone does not
                    b.failures = 0
                if models is not None:
                    self._apply_models(b, models, scraped)
                r = self.fleet.replicas.get(b.replica_id)
                if scraped is not None and b.connected and r is not None:
                    load = ScrapedLoad(
                        r, running=scraped.running, waiting=scraped.waiting, kv_usage=scraped.kv_usage,
                        own_at_scrape=own if r is r0 else 0, sent_at=sent, wall_time=time.time(),
                        clock=self._now, max_age=self.sample_max_age_s,
                    )  # fmt: skip
                    r.set_sample(load, sent, live=True)  # type: ignore[arg-type]  # duck-types LoadSample
            await asyncio.sleep(self.scrape_interval_s)

    def _now(self) -> float:
        clock = self.fleet.clock
        return clock() if clock is not None else time.monotonic()

    def _failed(self, b: Backend, why: str) -> None:
        b.failures += 1
        b.last_error = why
        if b.connected and b.failures >= self.fail_threshold:
            log.warning("backend %s ejected after %d failed probes: %s", b.url, b.failures, why)
            self._eject(b, why)
        elif not b.connected and (b.failures in (1, 10) or b.failures % 100 == 0):
            log.info("backend %s not admitted: %s", b.url, why)

    def _apply_models(self, b: Backend, models: ModelList, scraped: Scraped | None) -> None:
        if not b.connected:
            self._admit(b, models, scraped)
        elif b.info is not None and models.base != b.info.model:
            self._eject(b, f"now serves model '{models.base}' instead of '{b.info.model}'")
            self._admit(b, models, scraped)
        r = self.fleet.replicas.get(b.replica_id)
        if r is None:
            return
        for name, root in models.adapters.items():
            if b.adapters.get(name) != "gpu":
                b.adapters[name] = "gpu"
                b.sources.setdefault(name, root)
                self._emit(b, AdapterLoaded(b.replica_id, name, "gpu"))
        for name in [n for n in b.adapters if n not in models.adapters]:
            del b.adapters[name]  # unloaded by someone else
        r.adapters_gpu = set(b.adapters)  # the backend's list is the truth, not our guesses
        r.adapters_cpu.clear()

    def _admit(self, b: Backend, models: ModelList, scraped: Scraped | None) -> None:
        old = self.by_replica.get(b.replica_id)
        if old is not None and old is not b:
            self._eject(old, f"replica id now served by {b.url}")
        try:
            profile = self.profiles.get(b.gpu_class) or self.resolve_profile(b.gpu_class)
        except ValueError as e:  # an unknown GPU class: say so (the probe loop would die silently)
            why = f"GPU class '{b.gpu_class}': {e}"
            if b.last_error != why:
                log.warning("backend %s not admitted: %s", b.url, why)
            b.last_error = why
            return
        self._warn_undeclared(models.base)
        cap = 0
        if scraped is not None and scraped.num_gpu_blocks and scraped.block_size:
            cap = max(1, scraped.num_gpu_blocks * scraped.block_size // self.block_size)
        info = EngineInfo(
            replica_id=b.replica_id, model=models.base, gpu_class=b.gpu_class, profile=profile.name,
            block_size=self.block_size, kv_capacity_blocks=cap, max_model_len=models.max_model_len,
            engine="openai", address=b.url,
        )  # fmt: skip
        self.fleet.add_replica(
            b.replica_id,
            model=models.base,
            gpu_class=b.gpu_class,
            profile=profile,
            block_size=self.block_size,
            kv_capacity_blocks=cap or None,
            address=b.url,
        )
        b.info = info
        b.connected = True
        b.adapters.clear()
        self.by_replica[b.replica_id] = b
        if self.kv_events_port:
            self._subscribe(b)
        log.info("backend %s (%s, %s) admitted as %s", b.url, models.base, b.gpu_class, b.replica_id)
        if self.on_membership is not None:
            self.on_membership(b.replica_id, True)
        self._notify()

    def _warn_undeclared(self, model: str) -> None:
        """One WARNING per model a backend serves that the policy's ModelPool does not declare."""
        if not self.declared_models or model in self.declared_models or model in self._warned_models:
            return
        self._warned_models.add(model)
        log.warning(
            "a backend serves model '%s', which the ModelPool does not declare (its models: %s): requests "
            "for the pool's models get 503 until a backend serves them; check spec.models[].name against "
            "the backends' /v1/models (vLLM --served-model-name)",
            model, ", ".join(sorted(self.declared_models)),
        )  # fmt: skip

    def _subscribe(self, b: Backend) -> None:
        """Read the backend's KV events (vLLM's ZMQ publisher on its host, ``kv_events_port``)."""
        from ..events import AllBlocksCleared, BlockRemoved, BlockStored
        from .kv_events import KvEventSubscriber

        rid, fleet = b.replica_id, self.fleet
        host = urlsplit(b.url).hostname or "127.0.0.1"
        endpoint = f"tcp://{host}:{self.kv_events_port}"

        def apply(ev: Any) -> None:  # precise: the events are the truth; approximate: they refine it
            r = fleet.replicas.get(rid)
            if r is None:
                return
            if fleet.index_mode == "precise":
                fleet.apply(ev)
            elif isinstance(ev, BlockStored):
                r.index.insert(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                r.index.remove(ev.block_hashes)
            else:
                r.index.clear()

        b.kv = KvEventSubscriber(
            endpoint, self.block_size,
            on_stored=lambda hs: apply(BlockStored(rid, tuple(hs))),
            on_removed=lambda hs: apply(BlockRemoved(rid, tuple(hs))),
            on_cleared=lambda: apply(AllBlocksCleared(rid)),
            topic=self.kv_events_topic,
        )  # fmt: skip
        b.kv_task = asyncio.create_task(self._kv_run(b), name=f"corral-kv-events-{rid}")

    async def _kv_run(self, b: Backend) -> None:
        try:
            await b.kv.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("KV events of backend %s (%s) stopped", b.url, b.kv.endpoint)

    def _eject(self, b: Backend, why: str) -> None:
        if b.kv_task is not None:
            b.kv_task.cancel()
            b.kv_task = None
        was = b.connected
        b.connected = False
        if not was or self.by_replica.get(b.replica_id) is not b:
            return
        del self.by_replica[b.replica_id]
        self.fleet.remove_replica(b.replica_id)
        log.info("backend %s (%s) left routing: %s", b.url, b.replica_id, why)
        if self.on_membership is not None:
            self.on_membership(b.replica_id, False)

    def _notify(self) -> None:
        async def go() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(go())

    def _emit(self, b: Backend, ev: EngineEvent) -> None:
        self.fleet.apply(ev)
        if self.on_event is not None:
            self.on_event(b.replica_id, ev)

    def _adapter_lost(self, b: Backend, name: str) -> None:
        b.adapters.pop(name, None)
        r = self.fleet.replicas.get(b.replica_id)
        if r is not None:
            r.adapters_gpu.discard(name)

    def _adapter_loaded(self, b: Backend, name: str, source: str) -> None:
        b.adapters[name] = "gpu"
        b.sources[name] = source
        if b.connected:
            self._emit(b, AdapterLoaded(b.replica_id, name, "gpu"))

    # ---- the EnginePool interface the router uses ------------------------------------------------------
    def set_profiles(self, profiles: Mapping[str, Any]) -> None:
        self.profiles = dict(profiles)
        for b in self.by_replica.values():
            r = self.fleet.replicas.get(b.replica_id)
            p = self.profiles.get(b.gpu_class)
            if r is not None and p is not None and p != r.profile:
                r.profile = p
                self.fleet.version += 1

    def status(self) -> list[dict[str, Any]]:
        """Every known backend: URL, replica id, admitted or not, consecutive failures, last error."""
        return [
            {"url": b.url, "replica": b.replica_id, "admitted": b.connected, "failures": b.failures,
             "last_error": b.last_error, "gpu_class": b.gpu_class, "adapters": sorted(b.adapters)}
            for b in self.conns.values()
        ]  # fmt: skip
