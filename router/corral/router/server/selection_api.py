"""The router's side of model selection (issue 15): choosing the model of a request that names the
selection model, the feedback API, and the selection's place in Explain and spans.

:class:`RouterSelection` (one per :class:`~corral.router.server.core.Router`) holds the bandit state
(:class:`~corral.router.selection.BanditStore`, persisted under ``RouterConfig.selection_state_dir``), the
feedback ledger, and the selector compiled from the current ``spec.modelSelection`` (recompiled when the
policy changes; bandit state is kept). The request path calls :meth:`RouterSelection.choose` before the
model is resolved and :meth:`RouterSelection.bind` once the request has its id; the fronts call
:meth:`RouterSelection.feedback` (``POST /v1/feedback``, gRPC ``Feedback``) and show
:attr:`Prepared.selection` in Explain. The response's ``model`` is the chosen model or adapter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from corral.api.profiles import adapter_mb
from corral.v1 import engine_pb2 as epb

from ..selection import FeedbackError, RequestInfo, Selection, Selector, compile_selection
from ..selection.bandit import BanditStore, FeedbackLedger
from ..selection.log import DecisionLog
from .errors import BadRequest, NotFound, RouterError
from .limits import MAX_NAME_CHARS

if TYPE_CHECKING:
    from .core import ExplainRecord, Prepared, Router

log = logging.getLogger(__name__)


class Conflict(RouterError):
    """409 / ALREADY_EXISTS: feedback for a request was already given."""

    http_status: ClassVar[int] = 409
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.ALREADY_EXISTS
    type: ClassVar[str] = "invalid_request_error"


def _tenant_name(tenant: Any) -> str | None:
    """The tenant of a request (a name, or an auth principal carrying one)."""
    return getattr(tenant, "tenant", tenant)


def request_text(prompt: str | None, messages: Sequence[Mapping[str, Any]] | None) -> str:
    """What text signals read: the prompt, or the chat's message contents joined by newlines."""
    if messages is not None:
        return "\n".join(str(m.get("content") or "") for m in messages)
    return prompt or ""


class RouterSelection:
    """Model selection state of one router process."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.store = BanditStore(router.config.selection_state_dir, router.router_id)
        self.ledger = FeedbackLedger()
        log_path = router.config.selection_log
        self.log = DecisionLog(log_path) if log_path else None
        self._spec: object = None
        self._selector: Selector | None = None
        self._shadow_spec: object = None
        self._shadow: Selector | None = None
        self._io_error: str | None = None  # the last bookkeeping write error (logged once per cause)
        self.on_forecast: Callable[[str, float], None] | None = None
        """Told (arm, expected share) for each candidate a bandit did not choose this time: the adapter
        pager's demand forecast (the chosen one is counted when it is dispatched)."""

    @property
    def selector(self) -> Selector | None:
        """The selector of the current policy (compiled on first use after a change)."""
        spec = self.router.config.selection
        if spec is not self._spec:
            self._selector = compile_selection(spec, self.store, self.ledger)
            self._spec = spec
        return self._selector

    @property
    def shadow(self) -> Selector | None:
        """Shadow mode: ``RouterConfig.shadow_selection`` compiled (its bandits in memory only)."""
        spec = self.router.config.shadow_selection
        if spec is not self._shadow_spec:
            self._shadow = compile_selection(spec, BanditStore(), FeedbackLedger())
            self._shadow_spec = spec
        return self._shadow

    def close(self) -> None:
        self.store.close()
        if self.log is not None:
            self.log.close()

    # ---- the request path -------------------------------------------------------------------------------
    def selects(self, model: str) -> bool:
        """Whether a request naming ``model`` has its model chosen by the policy's selection."""
        sel_ = self.selector
        return sel_ is not None and model == sel_.model

    async def prepare(
        self, prepare: Any, router: Router, model: str, headers: Mapping[str, str] | None, **kw: Any
    ) -> Prepared:
        """``prepare`` (:func:`~corral.router.server.core.prepare_request`) of the chosen model, with the
        rule's sampling overrides, the selection attached and remembered for feedback. A long prompt's
        tokens (what promptTokens signals, bandit contexts and the decision log read) are counted in a
        worker thread, as the request path tokenizes long prompts, not on the event loop."""
        from .core import INLINE_TOKENIZE_CHARS

        count = None
        text = request_text(kw.get("prompt"), kw.get("messages"))
        if len(text) > INLINE_TOKENIZE_CHARS and self._needs_tokens():
            count = await self._count_off_loop(model, text)
        target, sampling, max_tokens, sel, info = self.choose(
            model, prompt=kw.get("prompt"), messages=kw.get("messages"), tenant=kw.get("tenant"),
            headers=headers, sampling=kw.get("sampling"), max_tokens=kw.get("max_tokens"), count_tokens=count,
        )  # fmt: skip
        p = await prepare(router, target, **{**kw, "sampling": sampling, "max_tokens": max_tokens})
        return self.bind(p, sel, info, kw.get("tenant"))

    def _needs_tokens(self) -> bool:
        """Whether a selection may read the prompt's token count (a promptTokens signal, a bandit rule's
        context, the decision log)."""
        if self.log is not None:
            return True
        for s in (self.selector, self.shadow):
            if s is not None and (
                any(x.prompt_tokens is not None for x in s.spec.signals) or any(r.bandit for r in s.rules)
            ):
                return True
        return False

    async def _count_off_loop(self, model: str, text: str) -> Callable[[], int]:
        """``count_tokens`` for :meth:`choose` with the count of a long ``text`` made in a worker thread
        (refused first when over the router's cap on prompt size)."""
        from .core import model_tokenizer_async

        cap = self.router.config.max_prompt_chars
        if len(text) > cap:
            raise BadRequest(f"the prompt is {len(text)} characters, over this router's cap of {cap}")
        sel_ = self.selector
        default = (sel_.default if sel_ is not None else None) or model
        tok = await model_tokenizer_async(self.router, self._base(default))
        n = len(await asyncio.to_thread(tok.encode, text))
        return lambda: n

    def _base(self, model: str) -> str:
        a = self.router.config.adapters.get(model) or self.router.pool.adapter_catalog().get(model)
        return a[0] if a is not None else model

    def _count(self, model: str, text: str) -> int:
        """Tokens of ``text`` with ``model``'s tokenizer (the ``promptTokens`` signal counts with the
        default target's: the target is not known yet)."""
        from .core import model_tokenizer  # the request path's tokenizer lookup (core imports this module)

        return len(model_tokenizer(self.router, self._base(model)).encode(text))

    def cost(self, candidate: str, tokens: int) -> float:
        """Expected seconds of GPU time for a request on ``candidate`` (mean over its replicas' GPU
        profiles: prefill plus ``default_max_tokens`` decode steps, times GPUs) plus the expected adapter
        load (POLAR): the mean load time over replicas where the adapter is not GPU-resident."""
        base = self._base(candidate)
        reps = self.router.fleet.candidates(base)
        if not reps:
            return 0.0
        out = self.router.config.default_max_tokens
        adapter = candidate if candidate != base else None
        ad = self.router.core.settings.adapters.get(candidate)
        mb = adapter_mb(ad.rank if ad is not None else 16)
        total = 0.0
        for r in reps:
            p = r.profile
            total += p.prefill_s(tokens) + out * p.decode_step_s(1)
            if adapter is not None:
                tier = r.adapter_tier(adapter)
                total += p.adapter_load_s(mb, tier)  # type: ignore[arg-type]
        return total / len(reps)

    def choose(
        self,
        model: str,
        *,
        prompt: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        tenant: Any,
        headers: Mapping[str, str] | None,
        sampling: epb.SamplingParams | None,
        max_tokens: int | None,
        count_tokens: Any = None,
    ) -> tuple[str, epb.SamplingParams | None, int | None, Selection | None, RequestInfo | None]:
        """(model, sampling, max_tokens) for a request naming ``model``: unchanged unless ``model`` is the
        selection model, else the chosen target with the rule's overrides applied, plus the trace."""
        sel_ = self.selector
        if sel_ is None or model != sel_.model:
            return model, sampling, max_tokens, None, None
        hdrs = signal_headers(headers)
        text = request_text(prompt, messages)
        if count_tokens is None:
            default = sel_.default or model
            count_tokens = lambda: self._count(default, text)  # noqa: E731
        info = RequestInfo(text, _tenant_name(tenant), hdrs, count_tokens)
        sel = sel_.select(info, self.cost)
        shadow = self.shadow
        if shadow is not None:  # what the shadow policy would have chosen: logged and explained, not used
            s = shadow.select(info, self.cost)
            sel.shadow, sel.shadow_selection = {"model": s.model, "rule": s.rule or "(default)"}, s
        o = sel.sampling
        if o is not None:
            sp = epb.SamplingParams()
            if sampling is not None:
                sp.CopyFrom(sampling)
            else:
                sp.top_p = 1.0
                sp.temperature = 1.0
            if o.temperature is not None:
                sp.temperature = o.temperature
            if o.top_p is not None:
                sp.top_p = o.top_p
            if o.top_k is not None:
                sp.top_k = o.top_k
            sampling = sp
            if o.max_tokens is not None:
                max_tokens = o.max_tokens if max_tokens is None else min(max_tokens, o.max_tokens)
        return sel.model, sampling, max_tokens, sel, info

    def bind(self, p: Prepared, sel: Selection | None, info: RequestInfo | None, tenant: Any) -> Prepared:
        """Attach the selection to the prepared request (remembered for feedback once it is dispatched)."""
        if sel is not None and info is not None:
            p.selection = sel
            sel.info, sel.tenant = info, _tenant_name(tenant)
        return p

    def dispatched(self, p: Prepared) -> None:
        """A selected request is being sent to an engine (not an Explain dry run): remember it for feedback
        (and the shadow policy's choice when it agrees, so that it learns too) and log the decision."""
        sel, sel_ = p.selection, self.selector
        if sel is None or sel.info is None or sel_ is None:
            return
        rid = p.rr.request_id
        if sel.forecast and self.on_forecast is not None:  # the pager's forecast: requests sent only
            for arm, share in sel.forecast.items():
                if arm != sel.model and share > 0.0:
                    self.on_forecast(arm, share)
        self._keep(sel_.remember, rid, sel.tenant, sel, sel.info)
        shadow, s = self.shadow, sel.shadow_selection
        if shadow is not None and s is not None and s.model == sel.model:  # its reward will be known
            self._keep(shadow.remember, rid, sel.tenant, s, sel.info)
        if self.log is not None:
            self._keep(self.log.decision, rid, sel.tenant, sel.info, sel)

    def _keep(self, write: Callable[..., None], *args: Any) -> None:
        """Bookkeeping that may touch disk (the shared ledger, the decision log): a failed write (a full or
        gone volume) is logged once per cause and never fails the request."""
        try:
            write(*args)
        except OSError as e:
            if str(e) != self._io_error:
                log.warning("model selection: %s not written (%s); requests go on", write.__qualname__, e)
            self._io_error = str(e)

    # ---- feedback ---------------------------------------------------------------------------------------
    async def feedback_async(self, request_id: str, score: object, tenant: Any) -> dict[str, Any]:
        """:meth:`feedback` for the fronts: with a shared state folder, the peers' ledger files (up to two
        capacities of lines each) are read in a worker thread, not on the event loop."""
        shared = self.store.shared
        if shared is None or self.selector is None or len(request_id) > MAX_NAME_CHARS:
            return self.feedback(request_id, score, tenant)
        unknown = request_id not in self.ledger.items
        peer, done = await asyncio.to_thread(
            lambda: (shared.find(request_id) if unknown else None, shared.done_elsewhere(request_id))
        )
        return self.feedback(request_id, score, tenant, _Peeked(shared, peer, done))

    def feedback(self, request_id: str, score: object, tenant: Any, shared: Any = None) -> dict[str, Any]:
        if len(request_id) > MAX_NAME_CHARS:  # as Generate's ids (both fronts; error details fit trailers)
            raise BadRequest(f"invalid field 'request_id': longer than {MAX_NAME_CHARS} characters")
        sel_ = self.selector
        try:
            if sel_ is None:
                raise FeedbackError(
                    404, f"unknown request id '{request_id}': this router's policy has no model selection"
                )
            got = sel_.feedback(request_id, _tenant_name(tenant), score, shared)
            shadow = self.shadow
            if shadow is not None and request_id in shadow.ledger.items:  # it chose the same: it learns
                shadow.feedback(request_id, _tenant_name(tenant), score)
            if self.log is not None:
                self._keep(self.log.feedback, request_id, float(score))  # type: ignore[arg-type]
            return got
        except FeedbackError as e:
            if e.status == 404:
                raise NotFound(e.message) from None
            if e.status == 409:
                raise Conflict(e.message) from None
            raise BadRequest(e.message) from None


class _Peeked:
    """A shared ledger whose lookups for one request id were made already (see ``feedback_async``)."""

    def __init__(self, shared: Any, peer: Any, done: bool) -> None:
        self.shared, self.peer, self.done = shared, peer, done

    def find(self, request_id: str) -> Any:
        return self.peer

    def done_elsewhere(self, request_id: str) -> bool:
        return self.done

    def mark_done(self, request_id: str) -> None:
        self.shared.mark_done(request_id)


def span_attributes(sel: Selection) -> dict[str, Any]:
    """``corral.select.*`` OpenTelemetry attributes of a selection."""
    out: dict[str, Any] = {
        **(
            {
                "corral.select.shadow.model": sel.shadow["model"],
                "corral.select.shadow.rule": sel.shadow["rule"],
            }
            if sel.shadow
            else {}
        ),
        "corral.select.model": sel.model,
        "corral.select.rule": sel.rule or "(default)",
        "corral.select.elapsed_us": sel.elapsed_us,
    }
    for name, value in sel.signals.items():
        out[f"corral.select.signal.{name}"] = value
        out[f"corral.select.matched.{name}"] = sel.matched.get(name, False)
    for s in sel.bandit or ():
        out[f"corral.select.bandit.{s.arm}.score"] = s.score
        out[f"corral.select.bandit.{s.arm}.predicted"] = s.predicted
        out[f"corral.select.bandit.{s.arm}.bonus"] = s.bonus
        out[f"corral.select.bandit.{s.arm}.cost"] = s.cost
    return out


# ---- fronts ---------------------------------------------------------------------------------------------

PRIVATE_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
"""Never given to header signals (their values would show in Explain and spans)."""


def signal_headers(headers: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> dict[str, str]:
    """A request's headers (or gRPC metadata) for header signals: lower-case names, credentials left out."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    return {str(k).lower(): str(v) for k, v in items if str(k).lower() not in PRIVATE_HEADERS}


def selection_to_dict(sel: Selection | None) -> dict[str, Any] | None:
    return sel.to_dict() if sel is not None else None


def selection_to_pb(sel: Selection, out: Any) -> None:
    """Fill a ``corral.v1.Selection`` message."""
    out.model, out.rule, out.elapsed_us = sel.model, sel.rule or "(default)", sel.elapsed_us
    out.algorithm = sel.algorithm
    for k, v in sel.signals.items():
        out.signals[k] = str(v).lower() if isinstance(v, bool) else str(v)
        out.matched[k] = bool(sel.matched.get(k, False))
    for s in sel.bandit or ():
        out.scores.add(arm=s.arm, predicted=s.predicted, bonus=s.bonus, cost=s.cost, score=s.score, n=s.n)


def feedback_body(body: Mapping[str, Any]) -> tuple[str, object]:
    """(request_id, score) of a ``POST /v1/feedback`` body, or :class:`BadRequest` naming the field."""
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise BadRequest("missing required field 'request_id' (the response's id, a string)")
    if "score" not in body:
        raise BadRequest("missing required field 'score' (a number in [0, 1])")
    return rid, body["score"]


def explain_to_dict(rec: ExplainRecord) -> dict[str, Any]:
    """An Explain record as JSON (``GET /v1/explain/{id}``): the same fields as the gRPC ExplainResponse."""
    d = rec.decision
    out: dict[str, Any] = {
        "request_id": rec.request_id,
        "policy": rec.policy,
        "prompt_tokens": rec.prompt_tokens,
        "prompt_blocks": rec.prompt_blocks,
        "attempts": list(rec.attempts),
        "dry_run": rec.dry_run,
    }
    if d is not None:
        out.update(replica_id=d.replica_id, reason=d.reason, cached_blocks=d.cached_blocks)
        out["candidates"] = [
            {"replica_id": c.replica_id, "gpu_class": c.gpu_class, "total_s": c.total_s, "queue_s": c.queue_s,
             "prefill_s": c.prefill_s, "adapter_s": c.adapter_s, "cached_blocks": c.cached_blocks,
             "adapter_tier": c.adapter_tier, "extra": dict(c.extra)}
            for c in d.candidates or []
        ]  # fmt: skip
    if rec.selection is not None:
        out["selection"] = rec.selection.to_dict()
    return out


def selection_card(router: Router) -> dict[str, Any] | None:
    """The ``/v1/models`` card of the selection model (``auto``), when the policy has a selection."""
    sel_ = router.selection.selector
    if sel_ is None:
        return None
    bases = {router.selection._base(t) for t in sel_.targets()}
    reps = [c for b in sorted(bases) for c in router.fleet.candidates(b)]
    return {
        "id": sel_.model, "object": "model", "created": 0, "owned_by": "corral", "parent": None,
        "root": sel_.default, "max_model_len": None, "replicas": len(reps),
        "gpu_classes": sorted({c.gpu_class for c in reps}), "selection": True,
    }  # fmt: skip
