"""The router's request path, independent of the front (gRPC or HTTP).

Per request: resolve ``model`` (a base model or an adapter name) -> tokenize and hash the prompt once ->
``policy.choose`` over the healthy replicas of the base model -> stream from the chosen engine over gRPC
(one hop) while keeping :class:`FleetState` accounting (dispatch, first token, finish). An engine that fails
before the first token is excluded and the request is retried on another replica; after the first token
the caller gets :class:`EngineFailed`. The policy can be swapped live with :meth:`Router.update_policy`
(fleet state, engine streams and in-flight requests are untouched).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from corral.v1 import engine_pb2 as epb
from opentelemetry import trace

from ..engine_client import Discovery, EnginePool
from ..events import AdapterLoaded, EngineEvent
from ..hashing import block_hashes, salt_for
from ..policy import NoReplicaError, Policy, make_policy
from ..state import FleetState, IndexMode, ReplicaState
from ..types import Decision, RoutingRequest
from .errors import BadRequest, EngineFailed, NotFound, RouterError, Unauthorized, Unavailable
from .metrics import RouterMetrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer("corral.router")

_ids = itertools.count(1)
_PREFIX = uuid.uuid4().hex[:8]


def new_request_id() -> str:
    return f"cmpl-{_PREFIX}{next(_ids):x}"


def tokenize(text: str) -> list[int]:
    """Byte-level tokenizer stand-in (one token per UTF-8 byte), shared with the sim engine."""
    return list(text.encode("utf-8"))


def detokenize(ids: Sequence[int]) -> str:
    return bytes(t for t in ids if 0 <= t < 256).decode("utf-8", "replace")


@dataclass(slots=True)
class RouterConfig:
    policy: str = "corral"
    policy_params: dict[str, Any] = field(default_factory=dict)
    index_mode: IndexMode = "approximate"
    api_keys: dict[str, str] | None = None  # key -> tenant; None = no auth
    isolate_tenants: bool = False  # salt prefix hashes with the tenant
    adapters: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (base model, source uri)
    max_attempts: int = 3
    stale_after_s: float = 1.0
    quarantine_s: float = 2.0
    default_max_tokens: int = 16
    explain_history: int = 2048
    explain_all: bool = True  # compute candidate cost terms for every decision (else: when traced)
    router_id: str = ""


@dataclass(slots=True)
class Prepared:
    """A parsed, resolved and hashed request, ready to route."""

    rr: RoutingRequest
    token_ids: list[int]
    model: str  # as the client named it
    adapter_source: str
    prompt: str
    sampling: epb.SamplingParams | None


@dataclass(slots=True)
class ExplainRecord:
    request_id: str
    policy: str
    decision: Decision | None
    prompt_tokens: int
    prompt_blocks: int
    attempts: list[str] = field(default_factory=list)
    dry_run: bool = False


class _ExcludingFleet:
    """A view of a fleet without some replicas (for retries); everything else delegates."""

    def __init__(self, fleet: FleetState, excluded: set[str]) -> None:
        self._fleet = fleet
        self._excluded = excluded
        self.version = (fleet.version << 16) ^ hash(frozenset(excluded))

    def candidates(self, model: str) -> list[ReplicaState]:
        return [r for r in self._fleet.candidates(model) if r.replica_id not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)


class Router:
    """Routing + dispatch for one router process. Fronts: :mod:`.grpc_api`, :mod:`.http_api`."""

    def __init__(self, discovery: Discovery, config: RouterConfig | None = None, **pool_kw: Any) -> None:
        self.config = cfg = config or RouterConfig()
        self.router_id = cfg.router_id or f"router-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fleet = FleetState(index_mode=cfg.index_mode)
        self.policy: Policy = make_policy(cfg.policy, **cfg.policy_params)
        self.policy_name = cfg.policy
        self.metrics = RouterMetrics(self.fleet, cfg.policy)
        self.pool = EnginePool(
            self.fleet,
            discovery,
            router_id=self.router_id,
            stale_after_s=cfg.stale_after_s,
            on_event=self._on_engine_event,
            on_membership=self._on_membership,
            **pool_kw,
        )
        self.explains: OrderedDict[str, ExplainRecord] = OrderedDict()
        self._t0 = time.monotonic()

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    # ---- live configuration -----------------------------------------------------------------------------
    def update_policy(self, strategy: str, params: dict[str, Any] | None = None) -> None:
        """Swap the routing policy live: fleet state, engine streams and in-flight requests are kept."""
        policy = make_policy(strategy, **(params or {}))  # raises ValueError on an unknown name
        self.policy, self.policy_name = policy, strategy
        self.config.policy, self.config.policy_params = strategy, dict(params or {})
        self.metrics.policy_name = strategy
        log.info("routing policy is now %s %s", strategy, params or {})

    def set_api_keys(self, keys: dict[str, str] | None) -> None:
        self.config.api_keys = keys

    def now(self) -> float:
        return time.monotonic() - self._t0

    # ---- engine callbacks ---------------------------------------------------------------------------------
    def _on_engine_event(self, replica_id: str, ev: EngineEvent) -> None:
        if isinstance(ev, AdapterLoaded):
            self.metrics.adapter_loads.labels(replica_id, ev.tier).inc()

    def _on_membership(self, replica_id: str, joined: bool) -> None:
        self.metrics.replica_changes.labels("join" if joined else "leave").inc()

    # ---- request preparation ------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> str | None:
        """API key -> tenant (``None`` when auth is off). Raises :class:`Unauthorized`."""
        keys = self.config.api_keys
        if keys is None:
            return None
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        tenant = keys.get(key)
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant

    def catalog(self) -> dict[str, tuple[str, str]]:
        """Adapters this router can route to: name -> (base model, source uri)."""
        cat = dict(self.config.adapters)
        for name, (base, src) in self.pool.adapter_catalog().items():
            if name not in cat or (src and not cat[name][1]):
                cat[name] = (base, src)
        return cat

    def available_models(self) -> list[str]:
        models = set(self.fleet.models())
        return sorted(models | {a for a, (b, _) in self.catalog().items() if b in models})

    def resolve_model(self, name: str) -> tuple[str, str | None, str]:
        """``model`` as named by a client -> (base model, adapter or None, adapter source)."""
        if not name:
            raise BadRequest("missing required field 'model'")
        if self.fleet.candidates(name) or name in self.fleet.models():
            return name, None, ""
        a = self.pool.adapter_catalog().get(name) or self.config.adapters.get(name)
        if a is not None:
            return a[0], name, a[1]
        avail = ", ".join(self.available_models()) or "(none: no engine replica is connected)"
        raise NotFound(f"model '{name}' not found; available: {avail}")

    def max_model_len(self, model: str) -> int:
        lens = [
            c.info.max_model_len
            for r in self.fleet.candidates(model)
            if (c := self.pool.by_replica.get(r.replica_id)) is not None and c.info and c.info.max_model_len
        ]
        return min(lens) if lens else 0

    def prepare(
        self,
        model: str,
        prompt: str | None,
        token_ids: Sequence[int] | None,
        max_tokens: int | None,
        tenant: str | None = None,
        request_id: str | None = None,
        sampling: epb.SamplingParams | None = None,
    ) -> Prepared:
        base, adapter, source = self.resolve_model(model)
        if token_ids:
            ids = list(token_ids)
            prompt = prompt or ""
        elif prompt is not None:
            ids = tokenize(prompt)
        else:
            raise BadRequest("missing required field 'prompt'")
        mt = self.config.default_max_tokens if max_tokens is None else int(max_tokens)
        if mt < 0:
            raise BadRequest(f"'max_tokens' must be >= 0 (got {mt})")
        limit = self.max_model_len(base)
        if limit and len(ids) + mt > limit:
            raise BadRequest(
                f"prompt is {len(ids)} tokens and max_tokens is {mt} ({len(ids) + mt} in total), "
                f"over model '{base}' max length of {limit} tokens"
            )
        cands = self.fleet.candidates(base)
        bs = cands[0].block_size if cands else 16
        salt = salt_for(adapter, tenant if self.config.isolate_tenants else None)
        rr = RoutingRequest(
            request_id=request_id or new_request_id(),
            model=base,
            block_hashes=block_hashes(ids, bs, salt),
            prompt_tokens=len(ids),
            max_tokens=mt,
            adapter=adapter,
            tenant=tenant,
            arrival=self.now(),
        )
        return Prepared(rr, ids, model, source, prompt or "", sampling)

    # ---- decisions ----------------------------------------------------------------------------------------
    def choose(self, rr: RoutingRequest, excluded: set[str] | None = None, explain: bool = False) -> Decision:
        fleet: Any = self.fleet if not excluded else _ExcludingFleet(self.fleet, excluded)
        if not fleet.candidates(rr.model):
            if excluded:
                raise Unavailable(
                    f"no healthy replica left for model '{rr.model}' "
                    f"after trying {', '.join(sorted(excluded))}"
                )
            raise Unavailable(f"no healthy replica serves model '{rr.model}'")
        try:
            return self.policy.choose(rr, fleet, self.now(), explain)
        except NoReplicaError as e:
            raise Unavailable(str(e) or f"no healthy replica serves model '{rr.model}'") from None

    def explain_dry_run(self, p: Prepared) -> ExplainRecord:
        d = self.choose(p.rr, explain=True)
        return ExplainRecord(p.rr.request_id, self.policy_name, d, p.rr.prompt_tokens, len(p.rr.block_hashes),
                             [d.replica_id], dry_run=True)  # fmt: skip

    def _record(self, rec: ExplainRecord) -> None:
        ex = self.explains
        ex[rec.request_id] = rec
        if len(ex) > self.config.explain_history:
            ex.popitem(last=False)

    # ---- dispatch ----------------------------------------------------------------------------------------
    async def stream(
        self, p: Prepared, api: str = "http"
    ) -> AsyncGenerator[tuple[str, epb.GenerateChunk], None]:
        """Yield (replica id, chunk) from the chosen engine, retrying before the first token."""
        rr = p.rr
        m = self.metrics
        fleet = self.fleet
        t0 = time.perf_counter()
        span = tracer.start_span("corral.route")
        explain = self.config.explain_all or span.is_recording()
        rec = ExplainRecord(rr.request_id, self.policy_name, None, rr.prompt_tokens, len(rr.block_hashes))
        self._record(rec)
        excluded: set[str] = set()
        req_pb: epb.GenerateRequest | None = None
        first = False
        last_err: str = ""
        code = "200"
        try:
            for _attempt in range(self.config.max_attempts):
                td = time.perf_counter()
                d = self.choose(rr, excluded, explain)
                m.decision_latency.observe(time.perf_counter() - td)
                rid = d.replica_id
                rec.decision = d
                rec.attempts.append(rid)
                conn = self.pool.by_replica.get(rid)
                r = fleet.replicas.get(rid)
                if conn is None or r is None:
                    excluded.add(rid)
                    continue
                m.decision(self.policy_name, rid, r.gpu_class)
                if req_pb is None:
                    req_pb = epb.GenerateRequest(
                        request_id=rr.request_id,
                        model=rr.model,
                        adapter=rr.adapter or "",
                        prompt_token_ids=p.token_ids,
                        block_hashes=rr.block_hashes,
                        max_tokens=rr.max_tokens,
                        sampling=p.sampling,
                        adapter_source=p.adapter_source,
                        tenant=rr.tenant or "",
                    )
                fleet.on_dispatch(rid, rr, d.cached_blocks)
                call = conn.stub.Generate(req_pb)
                try:
                    async for chunk in call:
                        if not first:
                            first = True
                            fleet.on_first_token(rid, rr.request_id)
                            m.ttft[api].observe(time.perf_counter() - t0)
                            m.prompt_blocks += len(rr.block_hashes)
                            m.prefix_hit_blocks += d.cached_blocks
                            m.prompt_tokens += rr.prompt_tokens
                        if chunk.cached_tokens:
                            m.prefix_hit_tokens += chunk.cached_tokens
                        yield rid, chunk
                    if not first:  # an empty stream: treat as a failure before the first token
                        raise grpc.aio.AioRpcError(
                            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                            details="engine closed the stream without a token",
                        )  # fmt: skip
                    if span.is_recording():
                        self._annotate(span, rec, time.perf_counter() - t0)
                    return
                except grpc.aio.AioRpcError as e:
                    status = e.code()
                    if status == grpc.StatusCode.NOT_FOUND:
                        raise NotFound(f"model '{p.model}': {e.details()}") from None
                    if status == grpc.StatusCode.INVALID_ARGUMENT:
                        raise BadRequest(e.details() or "invalid request") from None
                    if first:
                        raise EngineFailed(
                            f"engine replica {rid} failed after streaming started: "
                            f"{status.name}: {e.details()}"
                        ) from None
                    last_err = f"{rid}: {status.name}: {e.details()}"
                    excluded.add(rid)
                    m.retries.labels(status.name.lower()).inc()
                    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        self.pool.quarantine(rid, self.config.quarantine_s)
                    log.info("request %s failed on %s before its first token (%s): retrying",
                             rr.request_id, rid, status.name)  # fmt: skip
                finally:
                    fleet.on_finish(rid, rr.request_id)
                    if not call.done():
                        call.cancel()
            raise Unavailable(
                f"request {rr.request_id} failed on {len(excluded)} replica(s) before its first token; "
                f"last: {last_err}"
            )
        except RouterError as e:
            code = str(e.http_status)
            span.set_attribute("error.message", e.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "499"
            raise
        finally:
            m.request_done(api, code, time.perf_counter() - t0)
            span.end()

    def _annotate(self, span: Any, rec: ExplainRecord, elapsed: float) -> None:
        d = rec.decision
        span.set_attribute("corral.request_id", rec.request_id)
        span.set_attribute("corral.policy", rec.policy)
        span.set_attribute("corral.attempts", rec.attempts)
        span.set_attribute("corral.engine_time_s", elapsed)
        if d is not None:
            span.set_attribute("corral.replica", d.replica_id)
            span.set_attribute("corral.reason", d.reason)
            span.set_attribute("corral.cached_blocks", d.cached_blocks)
            for c in d.candidates or []:
                span.add_event(
                    "candidate",
                    {
                        "replica": c.replica_id,
                        "gpu_class": c.gpu_class,
                        "total_s": c.total_s,
                        "queue_s": c.queue_s,
                        "prefill_s": c.prefill_s,
                        "adapter_s": c.adapter_s,
                        "cached_blocks": c.cached_blocks,
                        "adapter_tier": c.adapter_tier,
                    },
                )


async def run_to_completion(
    router: Router, p: Prepared, api: str
) -> tuple[str, list[int], str, str, tuple[int, int, int]]:
    """Collect a whole completion: (replica, token ids, text, finish reason, (prompt, completion, cached))."""
    toks: list[int] = []
    texts: list[str] = []
    rid = ""
    finish = ""
    usage = (len(p.token_ids), 0, 0)
    async for r, c in router.stream(p, api):
        rid = r
        toks.extend(c.token_ids)
        if c.text:
            texts.append(c.text)
        if c.finish_reason:
            finish = c.finish_reason
            usage = (c.prompt_tokens or len(p.token_ids), c.completion_tokens or len(toks), c.cached_tokens)
    text = "".join(texts) if texts else detokenize(toks)
    return rid, toks, text, finish, usage
