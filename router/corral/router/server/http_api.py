"""OpenAI-compatible HTTP front of the router (aiohttp): ``/v1/completions``, ``/v1/chat/completions``
(JSON or SSE streaming), ``/v1/models``, ``/health``, ``/ready``, ``/metrics``.

Requests are validated by the pydantic models of :mod:`.openai_models` (unknown fields ignored). Errors use
OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 malformed JSON / missing or invalid field
(named) / prompt too long, 401 bad API key, 404 unknown model or adapter, 429 every replica at its queue
bound (with ``Retry-After``), 503 no healthy replica, 500 for anything unexpected (logged, and counted as
500 in ``corral_requests``). A stream that fails before its first token gets a plain HTTP error (it was
retried first); one that fails after it gets a final ``data: {"error": ...}`` event and no ``[DONE]``.
Hostile clients meet the limits of :mod:`.limits`: 413 body too large, 408 body too slow, headers too slow
closes the connection; a client that disconnects cancels its request (counted 499).

Request ids: every request gets the router's own unique id (the response's ``id`` and the
``x-corral-request-id`` header, what Explain looks up); a client's ``x-request-id`` header is only a label,
echoed back in ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..backends.openai_http import CHAT_MESSAGES
from . import limits
from .core import Prepared, Router, detokenize, prepare_request, run_to_completion, simple_chat_prompt
from .errors import BadRequest, InternalError, NotFound, PayloadTooLarge, RequestTimeout, RouterError
from .openai_models import ChatCompletionRequest, CompletionRequest, parse
from .selection_api import explain_to_dict, feedback_body, selection_card

log = logging.getLogger(__name__)

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
_DONE = b"data: [DONE]\n\n"
_PREPARED = web.RequestKey("corral_prepared", Prepared)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _error(e: RouterError) -> web.Response:
    retry = getattr(e, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
    return _json(e.body(), status=e.http_status, headers=headers)


def _ids_headers(p: Prepared, replica: str) -> dict[str, str]:
    return {
        "x-corral-replica": replica,
        "x-corral-request-id": p.rr.request_id,
        "x-request-id": p.client_request_id or p.rr.request_id,
    }


def api_key_of(headers: Any) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else auth.strip()
    return headers.get("x-api-key")


def chat_prompt(messages: Any) -> str:
    """The simple chat template (models without their own): ``<|role|>\\ncontent\\n`` per message, then
    ``<|assistant|>\\n``. Validates ``messages`` as the chat endpoint does."""
    req = parse(ChatCompletionRequest, {"model": "-", "messages": messages})
    return simple_chat_prompt([m.as_dict() for m in req.messages])


_INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""What ``corral_requests`` counts (admin and listing calls, e.g. Explain, Feedback, models, are not)."""


@web.middleware
async def _json_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own 404 / 405 / 413 as OpenAI-shaped JSON errors (the handlers produce theirs)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        msg = f"{e.reason}: {request.method} {request.path}"
        body = {"error": {"message": msg, "type": kind.get(e.status, "invalid_request_error"), "param": None,
                          "code": e.status}}  # fmt: skip
        return web.json_response(
            body, status=e.status, headers={k: v for k, v in e.headers.items() if k == "Allow"}
        )


class HttpApi:
    reuse_port = False  # SO_REUSEPORT: several router worker processes share the port (server/workers.py)

    def __init__(
        self,
        router: Router,
        *,
        header_timeout_s: float = limits.HTTP_HEADER_TIMEOUT_S,
        body_timeout_s: float = limits.HTTP_BODY_TIMEOUT_S,
    ) -> None:
        self.router = router
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.app = web.Application(
            client_max_size=limits.HTTP_MAX_BODY_BYTES, middlewares=[_json_http_errors]
        )
        self.app.router.add_post("/v1/completions", self._wrap(self.completions))
        self.app.router.add_post("/v1/chat/completions", self._wrap(self.chat))
        self.app.router.add_get("/v1/models", self._wrap(self.models))
        self.app.router.add_post("/v1/feedback", self._wrap(self.feedback))
        self.app.router.add_get("/v1/explain/{request_id}", self._wrap(self.explain))
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/ready", self.ready)
        self.app.router.add_get("/metrics", self.metrics)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, host: str, port: int, ssl_context: Any = None) -> str:
        """Listen on ``host:port`` (0: any free port); HTTPS with ``ssl_context`` (:mod:`..tls`)."""
        limits.quiet_refusals()
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,  # a client that disconnects cancels its request (slot freed)
            keepalive_timeout=self.header_timeout_s,  # also bounds the time to send a request's headers
            max_line_size=limits.HTTP_MAX_LINE_BYTES,
            max_field_size=limits.HTTP_MAX_LINE_BYTES,
            max_headers=limits.HTTP_MAX_HEADERS,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host, port, backlog=1024, ssl_context=ssl_context, reuse_port=self.reuse_port or None
        )
        await site.start()
        server: Any = site._server
        sockets = server.sockets if server is not None else []
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.url = f"{'https' if ssl_context is not None else 'http'}://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def _wrap(
        self, fn: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Errors -> OpenAI-shaped responses. An inference request (``corral_requests`` counts those, as
        the gRPC front counts Generate/GenerateStream) that never reached :meth:`Router.stream` (which
        counts the ones it handles) is counted here, under its error's status."""

        async def handler(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            try:
                return await fn(request)
            except RouterError as e:
                self._count(request, str(e.http_status), t0)
                return _error(e)
            except asyncio.CancelledError:  # the client went away (handler cancellation)
                self._count(request, "499", t0)
                raise
            except Exception as e:  # a bug: never a bare aiohttp 500 page, never counted as a success
                log.exception("internal error on %s %s", request.method, request.path)
                self._count(request, "500", t0)
                return _error(InternalError(f"internal error: {type(e).__name__}: {e}"))

        return handler

    def _count(self, request: web.Request, code: str, t0: float) -> None:
        p = request.get(_PREPARED)
        if request.path in _INFERENCE_PATHS and not (p and p.dispatched):
            self.router.metrics.request_done("http", code, time.perf_counter() - t0)

    # ---- helpers ----------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.body_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"request body not received within {self.body_timeout_s:g} s (the router's limit)"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                f"request body is over the router's limit of {limits.HTTP_MAX_BODY_BYTES} bytes"
            ) from None
        except web.RequestPayloadError as e:  # bad chunking / Content-Encoding
            why = " ".join(str(e).split()).removeprefix("400, message: ")
            raise BadRequest(f"unreadable request body: {why}") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _tenant(self, request: web.Request) -> str | None:
        r = self.router
        return r.authenticate(api_key_of(request.headers)) if r.config.api_keys is not None else None

    async def _prepare(
        self, request: web.Request, req: CompletionRequest | ChatCompletionRequest, tenant: str | None
    ) -> Prepared:
        r = self.router
        prompt: str | None = None
        ids: list[int] | None = None
        messages: list[dict[str, str]] | None = None
        if isinstance(req, ChatCompletionRequest):
            messages = [m.as_dict() for m in req.messages]
            CHAT_MESSAGES.set(messages)  # OpenAI backends forward them (their own chat template)
        elif isinstance(req.prompt, str):
            prompt = req.prompt
        else:
            ids = req.prompt
        label = request.headers.get("x-request-id") or None
        if label is not None and len(label) > limits.MAX_NAME_CHARS:  # as gRPC's request_id
            raise BadRequest(f"invalid header 'x-request-id': longer than {limits.MAX_NAME_CHARS} characters")
        p = await prepare_request(
            r,
            req.model,
            prompt=prompt,
            token_ids=ids,
            messages=messages,
            max_tokens=req.new_tokens(),
            tenant=tenant,
            client_request_id=label,
            sampling=req.sampling(),
            ids_field="prompt",
            headers=request.headers,
        )
        request[_PREPARED] = p
        return p

    # ---- endpoints --------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        tenant = self._tenant(request)
        req = parse(CompletionRequest, await self._body(request))
        p = await self._prepare(request, req, tenant)
        if req.stream:
            return await self._sse(request, p, chat=False, include_usage=req.include_usage())
        rid, _toks, text, finish, (pt, ct, cached) = await run_to_completion(self.router, p, "http")
        return _json(
            {
                "id": p.rr.request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": p.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish or "stop"}],
                "usage": _usage(pt, ct, cached),
            },
            headers=_ids_headers(p, rid),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        tenant = self._tenant(request)
        req = parse(ChatCompletionRequest, await self._body(request))
        p = await self._prepare(request, req, tenant)
        if req.stream:
            return await self._sse(request, p, chat=True, include_usage=req.include_usage())
        rid, _toks, text, finish, (pt, ct, cached) = await run_to_completion(self.router, p, "http")
        return _json(
            {
                "id": p.rr.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": p.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish or "stop",
                    }
                ],
                "usage": _usage(pt, ct, cached),
            },
            headers=_ids_headers(p, rid),
        )

    async def _sse(
        self, request: web.Request, p: Prepared, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        p.dispatched = True
        gen = self.router.stream(p, "http")
        # Pull the first chunk before committing to a 200: errors until then are plain HTTP errors.
        try:
            rid, first = await gen.__anext__()
        except StopAsyncIteration:
            first, rid = None, ""
        created = int(time.time())
        rqid = p.rr.request_id
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rqid, "object": obj, "created": created, "model": p.model}
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **_ids_headers(p, rid)})
        usage: dict[str, int] | None = None
        try:
            await resp.prepare(request)  # in the try: the client may be gone already
            if chat:
                role = {
                    **head,
                    "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
                }
                await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
            c = first
            while c is not None:
                text = c.text or detokenize(c.token_ids, p.tokenizer)
                fin = c.finish_reason or None
                if chat:
                    choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": fin}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": fin}
                await resp.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
                if fin:
                    usage = _usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens)
                try:
                    _, c = await gen.__anext__()
                except StopAsyncIteration:
                    c = None
            if include_usage and usage is not None:
                await resp.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(_DONE)
        except RouterError as e:
            await resp.write(b"data: " + orjson.dumps(e.body()) + b"\n\n")
        except ConnectionResetError:  # the client went away mid-stream: stop (counted 499), nothing to send
            return resp
        except Exception as e:  # a bug after the 200 went out: a final OpenAI-shaped error event
            log.exception("internal error while streaming %s", rqid)
            err = InternalError(f"internal error: {type(e).__name__}: {e}")
            await resp.write(b"data: " + orjson.dumps(err.body()) + b"\n\n")
        finally:
            await gen.aclose()
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.StreamResponse:
        r = self.router
        tenant = r.authenticate(api_key_of(request.headers)) if r.config.api_keys is not None else None
        return _json({"object": "list", "data": list_models(r, tenant)})

    async def feedback(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/feedback`` {request_id, score}: reward the model selection's choice (issue 15)."""
        tenant = self._tenant(request)
        rid, score = feedback_body(await self._body(request))
        return _json(await self.router.selection.feedback_async(rid, score, tenant))

    async def explain(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/explain/{request_id}``: a recent request's decision (replica, cost terms, selection)."""
        r = self.router
        r.authorize_admin(api_key_of(request.headers), "/v1/explain")  # an admin endpoint, as gRPC Explain
        rid = request.match_info["request_id"]
        rec = r.explains.get(rid)
        if rec is None:
            raise NotFound(f"no recent decision for request '{rid}' (this router keeps the last "
                           f"{r.config.explain_history})")  # fmt: skip
        return _json(explain_to_dict(rec))

    async def health(self, request: web.Request) -> web.StreamResponse:
        n = sum(1 for x in self.router.fleet.replicas.values() if x.healthy)
        return _json({"status": "ok", "replicas": n, "policy": self.router.policy_name})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        n = sum(1 for x in self.router.fleet.replicas.values() if x.healthy)
        return _json({"ready": n > 0, "replicas": n}, status=200 if n else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        try:  # an admin endpoint: with API keys on, only role 'admin' keys read it
            self.router.authorize_admin(api_key_of(request.headers), "/metrics")
        except RouterError as e:
            return _error(e)
        return web.Response(
            body=self.router.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )


def _usage(pt: int, ct: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": pt + ct,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def list_models(r: Router, tenant: str | None = None) -> list[dict[str, Any]]:
    """Model cards: every base model with healthy replicas, plus every adapter routable on them, that
    ``tenant`` may see (another tenant's private adapters are never listed)."""
    out = []
    fleet = r.fleet
    for m in fleet.models():
        if not r.visible_to(tenant, m):
            continue
        cands = fleet.candidates(m)
        out.append(
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "corral",
                "parent": None,
                "root": m,
                "max_model_len": r.max_model_len(m) or None,
                "replicas": len(cands),
                "gpu_classes": sorted({c.gpu_class for c in cands}),
            }
        )
    for name, (base, _src) in sorted(r.catalog().items()):
        cands = fleet.candidates(base)
        if base not in fleet.models() or not r.visible_to(tenant, name):
            continue
        out.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "corral",
                "parent": base,
                "root": base,
                "max_model_len": r.max_model_len(base) or None,
                "replicas": len(cands),
                "gpu_classes": sorted({c.gpu_class for c in cands}),
            }
        )
    card = selection_card(r)  # spec.modelSelection's model ("auto"): the router picks among its targets
    if card is not None:
        out.append(card)
    return out
