"""OpenAI-compatible HTTP front of the router (aiohttp): ``/v1/completions``, ``/v1/chat/completions``
(JSON or SSE streaming), ``/v1/models``, ``/health``, ``/ready``, ``/metrics``.

Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 malformed JSON / missing or
invalid field / prompt too long, 401 bad API key, 404 unknown model or adapter, 503 no healthy replica.
A stream that fails before its first token gets a plain HTTP error (it was retried first); one that fails
after it gets a final ``data: {"error": ...}`` event and no ``[DONE]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from corral.v1 import engine_pb2 as epb

from .core import Prepared, Router, detokenize, run_to_completion
from .errors import BadRequest, RouterError

log = logging.getLogger(__name__)

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
_DONE = b"data: [DONE]\n\n"


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _error(e: RouterError) -> web.Response:
    return _json(e.body(), status=e.http_status)


def api_key_of(headers: Any) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else auth.strip()
    return headers.get("x-api-key")


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and kind in (int, float, (int, float)):
        raise BadRequest(f"field '{name}' must be a number, not a boolean")
    if not isinstance(v, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"field '{name}' must be of type {want} (got {type(v).__name__})")
    return v


def _sampling(body: dict[str, Any]) -> epb.SamplingParams | None:
    temp = _field(body, "temperature", (int, float))
    top_p = _field(body, "top_p", (int, float))
    seed = _field(body, "seed", int)
    stop = body.get("stop")
    if temp is None and top_p is None and seed is None and stop is None and "ignore_eos" not in body:
        return None
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("field 'stop' must be a string or a list of strings")
    return epb.SamplingParams(
        temperature=float(temp or 0.0),
        top_p=float(top_p if top_p is not None else 1.0),
        top_k=int(_field(body, "top_k", int, 0)),
        seed=int(seed or 0),
        stop=stop or [],
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def chat_prompt(messages: Any) -> str:
    """A simple chat template: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("field 'messages' must be a non-empty list of {role, content} objects")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"field 'messages[{i}]' must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BadRequest(f"field 'messages[{i}].content' must be a string or a list of text parts")
        parts.append(f"<|{m['role']}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class HttpApi:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/completions", self._wrap(self.completions))
        self.app.router.add_post("/v1/chat/completions", self._wrap(self.chat))
        self.app.router.add_get("/v1/models", self._wrap(self.models))
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/ready", self.ready)
        self.app.router.add_get("/metrics", self.metrics)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, host: str, port: int) -> str:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024)
        await site.start()
        server: Any = site._server
        sockets = server.sockets if server is not None else []
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.url = f"http://{shown}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @staticmethod
    def _wrap(
        fn: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except RouterError as e:
                return _error(e)

        return handler

    # ---- helpers ----------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _prepare(self, request: web.Request, body: dict[str, Any], prompt: Any) -> Prepared:
        r = self.router
        tenant = r.authenticate(api_key_of(request.headers)) if r.config.api_keys is not None else None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("missing required field 'model' (a model or adapter name)")
        token_ids = None
        if isinstance(prompt, list):
            if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                token_ids, prompt = prompt, None
            elif len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            else:
                raise BadRequest(
                    "field 'prompt' must be a string, a list of token ids, or a list of one string"
                )
        elif prompt is None:
            raise BadRequest("missing required field 'prompt'")
        elif not isinstance(prompt, str):
            raise BadRequest(f"field 'prompt' must be a string (got {type(prompt).__name__})")
        mt = body.get("max_tokens", body.get("max_completion_tokens"))
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool)):
            raise BadRequest(f"field 'max_tokens' must be an integer (got {type(mt).__name__})")
        rid = request.headers.get("x-request-id") or None
        return r.prepare(model, prompt, token_ids, mt, tenant, rid, _sampling(body))

    # ---- endpoints --------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        p = self._prepare(request, body, body.get("prompt"))
        if body.get("stream"):
            return await self._sse(request, p, chat=False, include_usage=_include_usage(body))
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
            headers={"x-corral-replica": rid, "x-request-id": p.rr.request_id},
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if "messages" not in body:
            raise BadRequest("missing required field 'messages'")
        p = self._prepare(request, body, chat_prompt(body["messages"]))
        if body.get("stream"):
            return await self._sse(request, p, chat=True, include_usage=_include_usage(body))
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
            headers={"x-corral-replica": rid, "x-request-id": p.rr.request_id},
        )

    async def _sse(
        self, request: web.Request, p: Prepared, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
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
        resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-corral-replica": rid, "x-request-id": rqid})
        await resp.prepare(request)
        usage: dict[str, int] | None = None
        try:
            if chat:
                role = {
                    **head,
                    "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
                }
                await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
            c = first
            while c is not None:
                text = c.text or detokenize(c.token_ids)
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
        finally:
            await gen.aclose()
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.StreamResponse:
        r = self.router
        if r.config.api_keys is not None:
            r.authenticate(api_key_of(request.headers))
        return _json({"object": "list", "data": list_models(r)})

    async def health(self, request: web.Request) -> web.StreamResponse:
        n = sum(1 for x in self.router.fleet.replicas.values() if x.healthy)
        return _json({"status": "ok", "replicas": n, "policy": self.router.policy_name})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        n = sum(1 for x in self.router.fleet.replicas.values() if x.healthy)
        return _json({"ready": n > 0, "replicas": n}, status=200 if n else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.router.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )


def _include_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return bool(isinstance(so, dict) and so.get("include_usage"))


def _usage(pt: int, ct: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "total_tokens": pt + ct,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def list_models(r: Router) -> list[dict[str, Any]]:
    """Model cards: every base model with healthy replicas, plus every adapter routable on them."""
    out = []
    fleet = r.fleet
    for m in fleet.models():
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
        if base not in fleet.models():
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
    return out
