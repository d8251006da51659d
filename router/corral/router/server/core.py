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
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from corral.api.admission import AdmissionSpec
from corral.api.selection import ModelSelection
from corral.v1 import engine_pb2 as epb
from opentelemetry import trace

from ..admission import Admission, Rejected, TooLarge, free_slots
from ..core import DispatchHook, RouterCore, Saturated
from ..engine_client import Discovery, EnginePool
from ..events import AdapterLoaded, EngineEvent
from ..policy import NoReplicaError, Policy
from ..request import build_request
from ..selection import Selection
from ..settings import RouterSettings, default_params
from ..state import FleetState, IndexMode
from ..tokenizer import SIM_TOKENIZER, ChatTemplateError, Tokenizer, TokenizerLoadError, load_tokenizer_cached
from ..tokenizer import max_token_bytes as _max_token_bytes
from ..types import Decision, RoutingRequest
from .admission_metrics import AdmissionCollector
from .auth import KeyStore, Principal, check_model_access, visible
from .auth_metrics import KeyStoreCollector
from .errors import (
    BadRequest,
    EngineFailed,
    Forbidden,
    NotFound,
    Overloaded,
    RouterError,
    Unauthorized,
    Unavailable,
)
from .held import HeldDispatcher
from .metrics import RouterMetrics
from .openai_models import U32, check_sampling
from .selection_api import RouterSelection, span_attributes

log = logging.getLogger(__name__)
tracer = trace.get_tracer("corral.router")

_ids = itertools.count(1)
_PREFIX = uuid.uuid4().hex[:8]


def new_request_id() -> str:
    return f"cmpl-{_PREFIX}{next(_ids):x}"


def tokenize(text: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """``text`` -> token ids with ``tokenizer`` (default: the simulator's, :data:`SIM_TOKENIZER`)."""
    return (tokenizer or SIM_TOKENIZER).encode(text)


def detokenize(ids: Sequence[int], tokenizer: Tokenizer | None = None) -> str:
    return (tokenizer or SIM_TOKENIZER).decode(ids)


_DEFAULTS = RouterSettings()  # the CRD's defaults (see corral.router.settings)


@dataclass(slots=True)
class RouterConfig:
    """One router process's configuration: the routing fields (also in :class:`RouterSettings`, the
    translation of the CRs; see :meth:`from_settings`) and the server's own knobs."""

    policy: str = _DEFAULTS.strategy
    policy_params: dict[str, Any] = field(default_factory=dict)  # empty: the CRD defaults' knobs
    index_mode: IndexMode = _DEFAULTS.index_mode
    max_queue_per_replica: int = _DEFAULTS.max_queue_per_replica
    ttft_slo_s: float = _DEFAULTS.ttft_slo_s
    api_keys: KeyStore | None = None  # tenants' API keys (server/auth.py); None = no auth
    adapter_owners: dict[str, str] = field(default_factory=dict)  # private adapter -> its tenant
    isolate_tenants: bool = False  # salt prefix hashes with the tenant
    adapters: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (base model, source uri)
    max_attempts: int = 3
    stale_after_s: float = 1.0
    quarantine_s: float = 2.0
    default_max_tokens: int = 16
    explain_history: int = 2048
    explain_all: bool = True  # compute candidate cost terms for every decision (else: when traced)
    router_id: str = ""
    selection: ModelSelection | None = None  # spec.modelSelection (selection_api.RouterSelection)
    selection_state_dir: str | None = None  # bandit state folder (shared by active-active routers)
    selection_log: str | None = None  # JSONL decision log of model selection (corral replay reads it)
    shadow_selection: ModelSelection | None = None  # shadow mode: evaluated beside the live one, logged
    # Tokenizers by base model (ModelSpec.tokenizer); a model not here uses the tokenizer its engines report
    # at registration (EngineInfo.tokenizer), else default_tokenizer (None: the sim's, SIM_TOKENIZER).
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)
    default_tokenizer: Tokenizer | None = None
    max_prompt_chars: int = 32 << 20  # hard cap on a text prompt, checked before tokenizing
    models: set[str] = field(default_factory=set)  # the pool's declared models: 503 (not 404) without engines
    admission: AdmissionSpec = field(default_factory=lambda: _DEFAULTS.admission)  # spec.admission
    profiles: dict[str, Any] = field(default_factory=dict)  # GPU class -> profile (ModelPool spec.gpuClasses)

    def settings(self) -> RouterSettings:
        """The routing part as :class:`RouterSettings` (what :class:`RouterCore` runs with)."""
        return RouterSettings(
            strategy=self.policy,
            policy_params=dict(self.policy_params) or default_params(self.policy, self.ttft_slo_s),
            index_mode=self.index_mode,
            ttft_slo_s=self.ttft_slo_s,
            max_queue_per_replica=self.max_queue_per_replica,
            isolate_tenants=self.isolate_tenants,
            admission=self.admission,
            selection=self.selection if self.selection is not None else _DEFAULTS.selection,
        )

    def apply_settings(self, s: RouterSettings) -> None:
        """Copy the routing fields of ``s`` (the CRs' translation) into this config."""
        self.policy, self.policy_params = s.strategy, dict(s.policy_params)
        self.index_mode, self.ttft_slo_s = s.index_mode, s.ttft_slo_s
        self.max_queue_per_replica, self.isolate_tenants = s.max_queue_per_replica, s.isolate_tenants
        self.adapters = {a.name: (a.base_model, a.source) for a in s.adapters.values()}
        self.adapter_owners = {a.name: a.tenant for a in s.adapters.values() if a.tenant}
        self.models = set(s.models)
        self.admission = s.admission
        self.selection = s.selection
        self.profiles = dict(s.profiles)

    @classmethod
    def from_settings(cls, s: RouterSettings, **server: Any) -> RouterConfig:
        cfg = cls(**server)
        cfg.apply_settings(s)
        return cfg


@dataclass(slots=True)
class Prepared:
    """A parsed, resolved and hashed request, ready to route."""

    rr: RoutingRequest  # rr.request_id: the router's own unique id (never the client's)
    token_ids: list[int]
    model: str  # as the client named it
    adapter_source: str
    prompt: str  # the prompt text (a chat's rendered template), also sent to the engine
    sampling: epb.SamplingParams | None
    client_request_id: str | None = None  # the client's id: a label echoed back, never a key
    tokenizer: Tokenizer = SIM_TOKENIZER  # the model's, for detokenizing chunks without text
    dispatched: bool = False  # set when handed to Router.stream (which then counts the request)
    selection: Selection | None = None  # how model selection chose `model` (spec.modelSelection)


@dataclass(slots=True)
class ExplainRecord:
    request_id: str
    policy: str
    decision: Decision | None
    prompt_tokens: int
    prompt_blocks: int
    attempts: list[str] = field(default_factory=list)
    dry_run: bool = False
    selection: Selection | None = None


class Router:
    """Routing + dispatch for one router process. Fronts: :mod:`.grpc_api`, :mod:`.http_api`."""

    def __init__(
        self,
        discovery: Discovery,
        config: RouterConfig | None = None,
        on_dispatch: DispatchHook | None = None,
        pool_cls: Any = EnginePool,  # or corral.router.backends.pool.BackendPool (OpenAI HTTP backends)
        **pool_kw: Any,
    ) -> None:
        self.config = cfg = config or RouterConfig()
        self.router_id = cfg.router_id or f"router-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._t0 = time.monotonic()
        self.core = RouterCore(cfg.settings(), clock=self.now, on_dispatch=on_dispatch)
        self.fleet: FleetState = self.core.fleet
        self.metrics = RouterMetrics(self.fleet, cfg.policy)
        if cfg.profiles:  # the pool's GPU classes (a caller's own profiles= wins)
            pool_kw.setdefault("profiles", cfg.profiles)
        self.pool = pool_cls(
            self.fleet,
            discovery,
            router_id=self.router_id,
            stale_after_s=cfg.stale_after_s,
            on_event=self._on_engine_event,
            on_membership=self._on_membership,
            **pool_kw,
        )
        self.explains: OrderedDict[str, ExplainRecord] = OrderedDict()
        self.selection = RouterSelection(self)  # spec.modelSelection: selectors, bandits, feedback
        self.admission = Admission(cfg.admission, lambda model: free_slots(self.core, model))
        self.held = HeldDispatcher(self.core)  # router-side queues of a holding policy (dualmap_paper)
        self.metrics.registry.register(AdmissionCollector(self.admission))
        self.metrics.registry.register(KeyStoreCollector(lambda: self.config.api_keys))

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        self.selection.close()

    # ---- live configuration -----------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self.core.policy

    @property
    def policy_name(self) -> str:
        return self.core.policy_name

    def update_policy(self, strategy: str, params: dict[str, Any] | None = None) -> None:
        """Swap the routing policy live: fleet state, engine streams and in-flight requests are kept."""
        self.core.set_policy(strategy, params)  # raises ValueError on an unknown name / bad param
        self.config.policy, self.config.policy_params = strategy, dict(params or {})
        self.metrics.policy_name = strategy
        log.info("routing policy is now %s %s", strategy, params or {})

    def configure(self, settings: RouterSettings) -> None:
        """Apply the CRs' translation live (policy, index mode, queue bound, tenants, adapters)."""
        self.core.configure(settings)  # raises ValueError before anything changes
        self.config.apply_settings(settings)
        self.admission.configure(settings.admission)
        self.metrics.policy_name = settings.strategy
        log.info("routing settings: %s %s", settings.strategy, dict(settings.policy_params))

    def set_api_keys(self, keys: KeyStore | dict[str, str] | None) -> None:
        """Tenants' API keys: a :class:`KeyStore` (a watched file), plain ``{key: tenant}`` (kept only as
        digests), or None (no auth)."""
        self.config.api_keys = KeyStore.from_keys(keys) if isinstance(keys, dict) else keys

    def now(self) -> float:
        return time.monotonic() - self._t0

    # ---- engine callbacks ---------------------------------------------------------------------------------
    def _on_engine_event(self, replica_id: str, ev: EngineEvent) -> None:
        if isinstance(ev, AdapterLoaded):
            self.metrics.adapter_loads.labels(replica_id, ev.tier).inc()

    def _on_membership(self, replica_id: str, joined: bool) -> None:
        self.metrics.replica_changes.labels("join" if joined else "leave").inc()
        if not joined:
            self.metrics.forget_replica(replica_id)

    # ---- request preparation ------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> str | None:
        """API key -> tenant (``None`` when auth is off). Raises :class:`Unauthorized`."""
        p = self.principal(key)
        return None if p is None else p.tenant

    def principal(self, key: str | None) -> Principal | None:
        """API key -> tenant and role (``None`` when auth is off). Raises :class:`Unauthorized`."""
        keys = self.config.api_keys
        if keys is None:
            return None
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        p = keys.lookup(key)
        if p is None:
            raise Unauthorized("invalid API key")
        return p

    def authorize_admin(self, key: str | None, what: str) -> None:
        """Admin endpoints (Explain, /metrics) need a key with role admin when auth is on."""
        p = self.principal(key)
        if p is not None and not p.admin:
            raise Forbidden(
                f"{what} needs an API key with role 'admin' (tenant '{p.tenant}' has 'inference')"
            )

    def check_access(self, tenant: str | None, model: str, adapter: str | None) -> None:
        check_model_access(self.config.api_keys, self.config.adapter_owners, tenant, model, adapter)

    def visible_to(self, tenant: str | None, name: str) -> bool:
        return visible(self.config.api_keys, self.config.adapter_owners, tenant, name)

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

    def resolve_model(self, name: str, tenant: str | None = None) -> tuple[str, str | None, str]:
        """``model`` as named by a client -> (base model, adapter or None, adapter source), if ``tenant`` may
        use it (:meth:`check_access`)."""
        if not name:
            raise BadRequest("missing required field 'model'")
        if self.fleet.candidates(name) or name in self.fleet.models() or name in self.config.models:
            self.check_access(tenant, name, None)
            return name, None, ""  # a declared model without engines yet: routing answers 503
        a = self.pool.adapter_catalog().get(name) or self.config.adapters.get(name)
        if a is not None:
            self.check_access(tenant, name, name)
            return a[0], name, a[1]
        models = self.available_models()
        if not models and not self.fleet.replicas and not self.config.models:  # nothing known yet: 503
            raise Unavailable(f"model '{name}' has no replica: no engine replica is connected yet")
        avail = ", ".join(m for m in models if self.visible_to(tenant, m))
        avail = avail or ("(none for this tenant)" if models else "(none: no engine replica is connected)")
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
        client_request_id: str | None = None,
        sampling: epb.SamplingParams | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        ids_field: str = "prompt_token_ids",
    ) -> Prepared:
        """Resolve, tokenize (with the model's tokenizer, on this thread) and hash one request. The fronts
        use :func:`prepare_request`, which loads tokenizers and tokenizes big prompts off the event loop.
        ``client_request_id`` is only a label: the request gets the router's own unique id."""
        if self.selection.selects(model):  # spec.modelSelection: choose the model, then prepare that
            m, sampling, max_tokens, sel, info = self.selection.choose(
                model, prompt=prompt, messages=messages, tenant=tenant, headers=None, sampling=sampling,
                max_tokens=max_tokens)  # fmt: skip
            p = self.prepare(m, prompt, token_ids, max_tokens, tenant, client_request_id, sampling,
                             messages=messages, ids_field=ids_field)  # fmt: skip
            return self.selection.bind(p, sel, info, tenant)
        base, adapter, source = self.resolve_model(model, tenant)
        tok = model_tokenizer(self, base)
        if token_ids:
            return _finish_prepare(self, model, base, adapter, source, tok, prompt or "", list(token_ids),
                                   max_tokens, tenant, client_request_id, sampling, ids_field)  # fmt: skip
        text, special = _prompt_text(self, base, tok, prompt, messages)
        ids = tok.encode(text, add_special_tokens=special)
        return _finish_prepare(self, model, base, adapter, source, tok, text, ids,
                               max_tokens, tenant, client_request_id, sampling, None)  # fmt: skip

    # ---- decisions ----------------------------------------------------------------------------------------
    def choose(self, rr: RoutingRequest, excluded: set[str] | None = None, explain: bool = False) -> Decision:
        try:
            return self.core.route(rr, excluded or frozenset(), explain)
        except Saturated as e:
            raise Overloaded(str(e), e.retry_after_s) from None
        except NoReplicaError as e:
            raise Unavailable(str(e) or f"no healthy replica serves model '{rr.model}'") from None

    async def _admit(self, rr: RoutingRequest) -> Any:
        """Admission control (RoutingPolicy spec.admission): a ticket to release when the request ends."""
        try:
            return await self.admission.admit(rr.tenant, rr.model, rr.prompt_tokens + rr.max_tokens)
        except Rejected as e:
            raise Overloaded(str(e), e.retry_after_s) from None
        except TooLarge as e:
            raise BadRequest(str(e)) from None

    def explain_dry_run(self, p: Prepared) -> ExplainRecord:
        d = self.choose(p.rr, explain=True)
        return ExplainRecord(p.rr.request_id, self.policy_name, d, p.rr.prompt_tokens, len(p.rr.block_hashes),
                             [d.replica_id], dry_run=True, selection=p.selection)  # fmt: skip

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
        core = self.core
        t0 = time.perf_counter()
        span = tracer.start_span("corral.route")
        explain = self.config.explain_all or span.is_recording()
        rec = ExplainRecord(rr.request_id, self.policy_name, None, rr.prompt_tokens, len(rr.block_hashes))
        if p.selection is not None:  # Explain keeps the audit trail, not what signals read (the prompt)
            rec.selection = replace(p.selection, info=None, shadow_selection=None)
        self._record(rec)
        excluded: set[str] = set()
        req_pb: epb.GenerateRequest | None = None
        first = False
        last_err: str = ""
        code = "200"
        ticket = None
        try:
            ticket = await self._admit(rr)
            if p.selection is not None:  # feedback and the decision log: requests let in (no dry runs, 429s)
                self.selection.dispatched(p)
            for _attempt in range(self.config.max_attempts):
                td = time.perf_counter()
                try:
                    d = self.choose(rr, excluded, explain)
                except Unavailable as e:  # no replica left to try: say why the last attempt failed
                    if not last_err:
                        raise
                    raise Unavailable(f"{e.message}; last error: {last_err}") from None
                m.decision_latency.observe(time.perf_counter() - td)
                held = core.holds and not excluded  # a holding policy: wait in its router queue
                if held:
                    d = await self.held.wait(rr, d)  # released and already dispatched
                rid = d.replica_id
                rec.decision = d
                rec.attempts.append(rid)
                conn = self.pool.by_replica.get(rid)
                r = fleet.replicas.get(rid)
                if conn is None or r is None:
                    if held:
                        core.finish(rid, rr.request_id)
                    excluded.add(rid)
                    continue
                m.decision(self.policy_name, rid, r.gpu_class)
                if req_pb is None:
                    req_pb = generate_request_pb(p)
                if not held:
                    core.dispatch(rid, rr, d)
                call = conn.stub.Generate(req_pb)
                try:
                    async for chunk in call:
                        if not first:
                            first = True
                            core.first_token(rid, rr.request_id)
                            self.admission.kick()  # a replica queue slot freed
                            self.held.pump()
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
                    core.finish(rid, rr.request_id)
                    self.held.pump()
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
        except Exception as e:  # a bug: the fronts answer an OpenAI-shaped 500; count it as one
            code = "500"
            span.set_attribute("error.message", f"{type(e).__name__}: {e}")
            raise
        finally:
            if ticket is not None:
                ticket.release()
            m.request_done(api, code, time.perf_counter() - t0)
            span.end()

    def _annotate(self, span: Any, rec: ExplainRecord, elapsed: float) -> None:
        d = rec.decision
        span.set_attribute("corral.request_id", rec.request_id)
        span.set_attribute("corral.policy", rec.policy)
        span.set_attribute("corral.attempts", rec.attempts)
        span.set_attribute("corral.engine_time_s", elapsed)
        if rec.selection is not None:
            span.set_attributes(span_attributes(rec.selection))
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


# ---- request preparation helpers (tokenizers, prompt size, validation) ---------------------------------

INLINE_TOKENIZE_CHARS = 16 << 10  # longer prompts are tokenized in a worker thread, off the event loop


def _engine_tokenizer(router: Router, base: str) -> tuple[str, str] | None:
    """(replica id, tokenizer location) the first healthy replica of ``base`` reported, if any."""
    for r in router.fleet.candidates(base):
        c = router.pool.by_replica.get(r.replica_id)
        if c is not None and c.info is not None and c.info.tokenizer:
            return r.replica_id, c.info.tokenizer
    return None


def _load_engine_tokenizer(base: str, replica: str, uri: str) -> Tokenizer:
    try:
        return load_tokenizer_cached(uri)
    except TokenizerLoadError as e:
        raise Unavailable(
            f"model '{base}': engine replica {replica} tokenizes with {uri}, which this router cannot "
            f"load ({e}); set spec.models[].tokenizer to a tokenizer.json the router can read"
        ) from None


def model_tokenizer(router: Router, base: str) -> Tokenizer:
    """The tokenizer of base model ``base``: the ModelPool's (``config.tokenizers``), else the one its
    engines report at registration, else ``config.default_tokenizer`` (the sim's when unset)."""
    tok = router.config.tokenizers.get(base)
    if tok is not None:
        return tok
    found = _engine_tokenizer(router, base)
    if found is not None:
        return _load_engine_tokenizer(base, *found)
    return router.config.default_tokenizer or SIM_TOKENIZER


async def model_tokenizer_async(router: Router, base: str) -> Tokenizer:
    """:func:`model_tokenizer`, loading an engine-reported tokenizer in a worker thread the first time."""
    tok = router.config.tokenizers.get(base)
    if tok is not None:
        return tok
    found = _engine_tokenizer(router, base)
    if found is not None:
        return await asyncio.to_thread(_load_engine_tokenizer, base, *found)
    return router.config.default_tokenizer or SIM_TOKENIZER


def simple_chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The chat template of models without one: ``<|role|>\\ncontent\\n`` per message, then
    ``<|assistant|>\\n``."""
    parts = [f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def check_prompt_size(
    router: Router, base: str, tok: Tokenizer, chars: int, what: str = "field 'prompt'"
) -> None:
    """Refuse a text prompt by its size, before it is tokenized: more characters than ``max_model_len``
    tokens of at most ``max_token_bytes`` bytes each can hold (characters <= UTF-8 bytes), or the cap."""
    cap = router.config.max_prompt_chars
    limit = router.max_model_len(base)
    per = _max_token_bytes(tok)
    if limit and limit * per < cap:
        if chars > limit * per:
            raise BadRequest(
                f"{what} is {chars} characters: over what model '{base}' can hold "
                f"({limit} tokens of at most {per} bytes each = {limit * per} characters); refused before "
                f"tokenizing"
            )
    elif chars > cap:
        raise BadRequest(f"{what} is {chars} characters, over this router's cap of {cap}")


def _chat_text(tok: Tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """A chat's prompt text and whether to add the tokenizer's special tokens when encoding it (not when
    the model's own template rendered it: the template holds them)."""
    try:
        text = tok.apply_chat_template(messages)
    except ChatTemplateError as e:
        raise BadRequest(f"field 'messages': {e}") from None
    return (simple_chat_prompt(messages), True) if text is None else (text, False)


def _prompt_text(
    router: Router,
    base: str,
    tok: Tokenizer,
    prompt: str | None,
    messages: Sequence[dict[str, Any]] | None,
) -> tuple[str, bool]:
    """The prompt text (a chat rendered with the model's template) and whether to encode it with special
    tokens; refused by size before rendering and before tokenizing."""
    _check_input_size(router, base, tok, prompt, messages)
    text, special = _render(tok, prompt, messages)
    check_prompt_size(router, base, tok, len(text))
    return text, special


def _check_input_size(
    router: Router, base: str, tok: Tokenizer, prompt: str | None, messages: Sequence[dict[str, Any]] | None
) -> int:
    what = "field 'prompt'"
    if messages is not None:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        what = "field 'messages' (all contents together)"
    elif prompt is not None:
        chars = len(prompt)
    else:
        raise BadRequest("missing required field 'prompt'")
    check_prompt_size(router, base, tok, chars, what)
    return chars


def _render(
    tok: Tokenizer, prompt: str | None, messages: Sequence[dict[str, Any]] | None
) -> tuple[str, bool]:
    """Pure (no router state): safe in a worker thread."""
    if messages is not None:
        return _chat_text(tok, messages)
    return prompt or "", True


def _render_and_encode(
    tok: Tokenizer, prompt: str | None, messages: Sequence[dict[str, Any]] | None
) -> tuple[str, list[int]]:
    text, special = _render(tok, prompt, messages)
    return text, tok.encode(text, add_special_tokens=special)


async def prepare_request(
    router: Router,
    model: str,
    *,
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
    max_tokens: int | None = None,
    tenant: str | None = None,
    client_request_id: str | None = None,
    sampling: epb.SamplingParams | None = None,
    ids_field: str = "prompt_token_ids",
    headers: Mapping[str, str] | None = None,
) -> Prepared:
    """:meth:`Router.prepare` for the fronts: tokenizers are loaded and big prompts tokenized in a worker
    thread; an oversized prompt is refused by its size before any of that. A request naming the model
    selection's model gets its model chosen first (``headers``: what header signals read)."""
    if router.selection.selects(model):
        return await router.selection.prepare(prepare_request, router, model, headers, prompt=prompt,
            token_ids=token_ids, messages=messages, max_tokens=max_tokens, tenant=tenant,
            client_request_id=client_request_id, sampling=sampling, ids_field=ids_field)  # fmt: skip
    base, adapter, source = router.resolve_model(model, tenant)
    tok = await model_tokenizer_async(router, base)
    if token_ids:
        return _finish_prepare(router, model, base, adapter, source, tok, prompt or "", list(token_ids),
                               max_tokens, tenant, client_request_id, sampling, ids_field)  # fmt: skip
    chars = _check_input_size(router, base, tok, prompt, messages)  # on the loop: reads fleet state
    if chars > INLINE_TOKENIZE_CHARS:  # the chat template, too, renders off the loop
        text, ids = await asyncio.to_thread(_render_and_encode, tok, prompt, messages)
    else:
        text, ids = _render_and_encode(tok, prompt, messages)
    check_prompt_size(router, base, tok, len(text))
    return _finish_prepare(router, model, base, adapter, source, tok, text, ids,
                           max_tokens, tenant, client_request_id, sampling, None)  # fmt: skip


def _finish_prepare(
    router: Router,
    model: str,
    base: str,
    adapter: str | None,
    source: str,
    tok: Tokenizer,
    text: str,
    ids: list[int],
    max_tokens: int | None,
    tenant: str | None,
    client_request_id: str | None,
    sampling: epb.SamplingParams | None,
    ids_field: str | None,
) -> Prepared:
    """Validate token ids (when the client sent them), max_tokens and sampling; check the model's length
    in tokens; hash; give the request the router's own id."""
    if not ids:
        raise BadRequest("field 'prompt' is empty: a prompt needs at least one token")
    if ids_field is not None:
        arr = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= min(tok.vocab_size, U32)))
        if bad.size:
            i = int(bad[0])
            raise BadRequest(
                f"invalid field '{ids_field}[{i}]': token id {ids[i]} is outside the vocabulary of model "
                f"'{base}' ({tok.name}: 0 <= id < {tok.vocab_size})"
            )
    mt = router.config.default_max_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= mt < U32:
        raise BadRequest(f"invalid field 'max_tokens': must be in [1, 2^32 - 1] (got {mt})")
    sp = check_sampling(sampling)
    limit = router.max_model_len(base)
    if limit and len(ids) + mt > limit:
        raise BadRequest(
            f"invalid field 'max_tokens': the prompt is {len(ids)} token{'s' if len(ids) != 1 else ''} and "
            f"max_tokens is {mt} ({len(ids) + mt} in total), over model '{base}' max length of {limit} "
            f"tokens; lower max_tokens or shorten the prompt"
        )
    cands = router.fleet.candidates(base)
    bs = cands[0].block_size if cands else 16
    rr = build_request(
        new_request_id(),
        base,
        tokens=ids,
        adapter=adapter,
        tenant=tenant,
        isolate_tenant=router.config.isolate_tenants,
        max_tokens=mt,
        block_size=bs,
        arrival=router.now(),
    )
    return Prepared(rr, ids, model, source, text, sp, client_request_id or None, tok)


def generate_request_pb(p: Prepared) -> epb.GenerateRequest:
    """The engine's GenerateRequest for a prepared request: token ids (what the engine runs, so its
    blocks line up with the router's hashes) and the prompt text (for engines with their own tokenizer)."""
    rr = p.rr
    return epb.GenerateRequest(
        request_id=rr.request_id,
        model=rr.model,
        adapter=rr.adapter or "",
        prompt_token_ids=p.token_ids,
        block_hashes=rr.block_hashes,
        max_tokens=rr.max_tokens,
        sampling=p.sampling,
        adapter_source=p.adapter_source,
        tenant=rr.tenant or "",
        prompt=p.prompt,
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
    p.dispatched = True
    async for r, c in router.stream(p, api):
        rid = r
        toks.extend(c.token_ids)
        if c.text:
            texts.append(c.text)
        if c.finish_reason:
            finish = c.finish_reason
            usage = (c.prompt_tokens or len(p.token_ids), c.completion_tokens or len(toks), c.cached_tokens)
    text = "".join(texts) if texts else detokenize(toks, p.tokenizer)
    return rid, toks, text, finish, usage
