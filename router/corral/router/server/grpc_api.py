"""gRPC front of the router: ``corral.v1.Router`` (Generate, GenerateStream, ListModels, Explain), plus
the standard ``grpc.health.v1`` service and server reflection.

Errors map to status codes: INVALID_ARGUMENT (bad field, named; prompt too long), UNAUTHENTICATED (API
key), NOT_FOUND (unknown model/adapter), RESOURCE_EXHAUSTED (every replica at its queue bound),
UNAVAILABLE (no healthy replica; or the engine failed after the first token, with a message saying so),
INTERNAL for anything unexpected (logged, counted as 500). ``CompletionRequest.request_id`` is a label,
echoed as ``client_request_id``; the response's ``request_id`` is the router's own unique id.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..wire import candidate_to_pb
from .core import ExplainRecord, Prepared, Router, detokenize, prepare_request, run_to_completion
from .errors import BadRequest, InternalError, NotFound, RouterError
from .grpc_decode import StrictDecoding
from .http_api import list_models
from .limits import GRPC_MAX_MESSAGE_BYTES, MAX_NAME_CHARS, clip
from .selection_api import selection_to_pb, signal_headers

log = logging.getLogger(__name__)

GRPC_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]


def _api_key(context: grpc.aio.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            scheme, _, token = str(v).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else str(v).strip()
        if k == "x-api-key":
            return str(v)
    return None


class RouterServicer(rpb_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        r = self.router
        return r.authenticate(_api_key(context)) if r.config.api_keys is not None else None

    @staticmethod
    def _check(req: rpb.CompletionRequest) -> None:
        if not req.model:
            raise BadRequest("missing required field 'model' (a model or adapter name)")
        for name in ("model", "request_id"):
            if len(getattr(req, name)) > MAX_NAME_CHARS:
                raise BadRequest(f"invalid field '{name}': longer than {MAX_NAME_CHARS} characters")
        if not req.prompt and not req.prompt_token_ids:
            raise BadRequest("missing required field 'prompt' (or 'prompt_token_ids')")

    async def _prepare(self, req: rpb.CompletionRequest, context: grpc.aio.ServicerContext) -> Prepared:
        tenant = self._tenant(context)
        self._check(req)
        return await prepare_request(
            self.router,
            req.model,
            prompt=req.prompt or None,
            token_ids=req.prompt_token_ids or None,
            max_tokens=req.max_tokens or None,
            tenant=tenant,
            client_request_id=req.request_id or None,
            sampling=req.sampling if req.HasField("sampling") else None,
            ids_field="prompt_token_ids",
            headers=signal_headers(context.invocation_metadata()),
        )

    async def _fail(
        self, context: grpc.aio.ServicerContext, e: Exception, p: Prepared | None, t0: float
    ) -> Any:
        """Abort the call with the error's status; count it unless Router.stream already did."""
        if not isinstance(e, RouterError):
            log.exception("internal error in gRPC Generate")
            e = InternalError(f"internal error: {type(e).__name__}: {e}")
        if p is None or not p.dispatched:
            self.router.metrics.request_done("grpc", str(e.http_status), time.perf_counter() - t0)
        await context.abort(e.grpc_code, clip(e.message))

    @staticmethod
    async def _internal(context: grpc.aio.ServicerContext, e: Exception, method: str) -> None:
        log.exception("internal error in gRPC %s", method)
        err = InternalError(f"internal error: {type(e).__name__}: {e}")
        await context.abort(err.grpc_code, clip(err.message))

    async def Generate(self, request: rpb.CompletionRequest, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.perf_counter()
        p: Prepared | None = None
        try:
            p = await self._prepare(request, context)
            rid, toks, text, finish, (pt, ct, cached) = await run_to_completion(self.router, p, "grpc")
        except Exception as e:
            await self._fail(context, e, p, t0)
        assert p is not None
        return rpb.CompletionResponse(
            request_id=p.rr.request_id,
            model=p.model,
            text=text,
            token_ids=toks,
            finish_reason=finish,
            usage=rpb.Usage(prompt_tokens=pt, completion_tokens=ct, cached_tokens=cached),
            replica_id=rid,
            client_request_id=p.client_request_id or "",
        )

    async def GenerateStream(self, request: rpb.CompletionRequest, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.perf_counter()
        p: Prepared | None = None
        try:
            p = await self._prepare(request, context)
        except Exception as e:
            await self._fail(context, e, p, t0)
        assert p is not None
        first = True
        p.dispatched = True
        gen = self.router.stream(p, "grpc")
        try:
            async for rid, c in gen:
                out = rpb.CompletionChunk(
                    request_id=p.rr.request_id,
                    text=c.text or detokenize(c.token_ids, p.tokenizer),
                    token_ids=c.token_ids,
                    finish_reason=c.finish_reason,
                )
                if first:
                    out.replica_id = rid
                    out.client_request_id = p.client_request_id or ""
                    first = False
                if c.finish_reason:
                    out.usage.CopyFrom(
                        rpb.Usage(
                            prompt_tokens=c.prompt_tokens,
                            completion_tokens=c.completion_tokens,
                            cached_tokens=c.cached_tokens,
                        )
                    )
                await context.write(out)
        except Exception as e:
            await self._fail(context, e, p, t0)
        finally:
            await gen.aclose()

    async def ListModels(self, request: rpb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        r = self.router
        tenant: str | None = None
        try:
            if r.config.api_keys is not None:
                tenant = r.authenticate(_api_key(context))
        except RouterError as e:
            await context.abort(e.grpc_code, clip(e.message))
        cards = [
            rpb.ModelCard(
                id=m["id"],
                parent=m["parent"] or "",
                replicas=m["replicas"],
                gpu_classes=m["gpu_classes"],
                max_model_len=m["max_model_len"] or 0,
            )
            for m in list_models(r, tenant)
        ]
        return rpb.ListModelsResponse(models=cards)

    async def Explain(self, request: rpb.ExplainRequest, context: grpc.aio.ServicerContext) -> Any:
        r = self.router
        try:
            r.authorize_admin(_api_key(context), "Explain")  # an admin endpoint
            rec: ExplainRecord | None
            if request.request_id:
                rec = r.explains.get(request.request_id)
                if rec is None:
                    raise NotFound(
                        f"no recent decision for request '{request.request_id}' "
                        f"(this router keeps the last {r.config.explain_history})"
                    )
            elif request.HasField("request"):
                rec = r.explain_dry_run(await self._prepare(request.request, context))
            else:
                raise BadRequest("set 'request_id' (a recent request) or 'request' (a dry run)")
        except RouterError as e:
            await context.abort(e.grpc_code, clip(e.message))
        except Exception as e:  # a bug: INTERNAL, as HTTP's 500 (not grpc's UNKNOWN)
            await self._internal(context, e, "Explain")
        assert rec is not None
        return explain_to_pb(rec)

    async def Feedback(self, request: rpb.FeedbackRequest, context: grpc.aio.ServicerContext) -> Any:
        """Reward the model selection's choice for a request (issue 15)."""
        try:
            tenant = self._tenant(context)
            got = await self.router.selection.feedback_async(request.request_id, request.score, tenant)
        except RouterError as e:
            await context.abort(e.grpc_code, clip(e.message))
        except Exception as e:  # a bug: INTERNAL, as HTTP's 500 (not grpc's UNKNOWN)
            await self._internal(context, e, "Feedback")
        return rpb.FeedbackResponse(**got)


def explain_to_pb(rec: ExplainRecord) -> rpb.ExplainResponse:
    d = rec.decision
    out = rpb.ExplainResponse(
        request_id=rec.request_id,
        policy=rec.policy,
        prompt_tokens=rec.prompt_tokens,
        prompt_blocks=rec.prompt_blocks,
        attempts=rec.attempts,
        dry_run=rec.dry_run,
    )
    if d is not None:
        out.replica_id = d.replica_id
        out.reason = d.reason
        out.cached_blocks = d.cached_blocks
        out.candidates.extend(candidate_to_pb(c) for c in d.candidates or [])
    if rec.selection is not None:
        selection_to_pb(rec.selection, out.selection)
    return out


class GrpcApi:
    reuse_port = False  # SO_REUSEPORT: several router worker processes share the port (server/workers.py)

    def __init__(self, router: Router) -> None:
        self.router = router
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.address = ""

    def _malformed(self, method: str) -> None:
        """An undecodable request (refused INVALID_ARGUMENT by :class:`StrictDecoding`): a 400."""
        if method.startswith("/corral.v1.Router/Generate"):
            self.router.metrics.request_done("grpc", "400", 0.0)

    async def start(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> str:
        """Listen on ``host:port``; TLS (mTLS) with ``credentials`` (:mod:`corral.router.tls`)."""
        opts = [
            (k, int(self.reuse_port)) if k == "grpc.so_reuseport" else (k, v) for k, v in GRPC_SERVER_OPTIONS
        ]
        server = grpc.aio.server(options=opts, interceptors=[StrictDecoding(self._malformed)])
        rpb_grpc.add_RouterServicer_to_server(RouterServicer(self.router), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            rpb.DESCRIPTOR.services_by_name["Router"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        addr = f"{host}:{port}"
        bound = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
        if bound == 0:
            raise OSError(f"cannot bind router gRPC on {host}:{port}")
        await server.start()
        self.server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("corral.v1.Router", health_pb2.HealthCheckResponse.SERVING)
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host
        self.address = f"{shown}:{bound}"
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            server, self.server = self.server, None
            await server.stop(grace)
