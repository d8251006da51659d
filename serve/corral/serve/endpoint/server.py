"""``EngineEndpoint``: a grpc.aio server that serves one :class:`~corral.serve.endpoint.engine.Engine`
over the ``corral.v1.Engine`` service (token streaming, adapter load/unload, event stream, info).

Usable from a Ray Serve replica or any asyncio program::

    server = await EngineEndpoint.start(engine, host="127.0.0.1", port=0)
    server.address          # "127.0.0.1:PORT", what routers dial
    await server.stop()

Every ``StreamEvents`` subscriber (one per router) first gets a snapshot (engine info, resident blocks,
adapters by tier), then batches of event deltas, flushed every ``flush_period_s`` while there are
events, and a ``LoadSample`` every ``sample_period_s`` (which doubles as the liveness heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from corral.router.events import AdapterLoaded, EngineEvent
from corral.router.tls import ServerTls
from corral.router.wire import event_to_pb, sample_to_pb, snapshot_to_pb
from corral.serve.adapter_sources import AdapterSourceError
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .engine import AdapterNotFoundError, Engine, EngineRequest
from .framed import FramedServer
from .mux import StreamAbort, serve_mux

log = logging.getLogger(__name__)

GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]


class _Subscriber:
    __slots__ = ("events", "wake")

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.wake = asyncio.Event()


class _EngineServicer(epb_grpc.EngineServicer):
    def __init__(self, ep: EngineEndpoint) -> None:
        self.ep = ep
        self.engine = ep.engine

    async def Generate(self, request: epb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with contextlib.aclosing(self.chunks(request)) as chunks:
                async for c in chunks:
                    await context.write(c)
        except StreamAbort as e:
            await context.abort(e.code, e.details)

    async def GenerateMux(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await serve_mux(self.chunks, request_iterator, context)

    async def chunks(self, request: epb.GenerateRequest) -> AsyncGenerator[epb.GenerateChunk, None]:
        """One request's chunks (what Generate streams; GenerateMux tags them with a stream id). Failures
        raise :class:`StreamAbort` with the status; closed early (client gone), it aborts the request."""
        eng = self.engine
        adapter = request.adapter or None
        if adapter is not None and not request.adapter_source and not eng.has_adapter(adapter):
            raise StreamAbort(
                grpc.StatusCode.NOT_FOUND, f"adapter {adapter!r} not found on {eng.info.replica_id}"
            )
        # No sampling message: OpenAI's defaults (temperature 1.0), not greedy.
        sp = request.sampling if request.HasField("sampling") else epb.SamplingParams(temperature=1.0)
        req = EngineRequest(
            request_id=request.request_id,
            model=request.model,
            prompt_token_ids=list(request.prompt_token_ids),
            max_tokens=request.max_tokens,
            block_hashes=list(request.block_hashes),
            adapter=adapter,
            adapter_source=request.adapter_source or None,
            tenant=request.tenant or None,
            prompt=request.prompt or None,
            temperature=sp.temperature,
            top_p=sp.top_p or 1.0,
            top_k=sp.top_k,
            seed=sp.seed,
            stop=list(sp.stop),
            ignore_eos=sp.ignore_eos,
        )
        finished = False
        chunk_cls = epb.GenerateChunk
        try:
            async for c in eng.generate(req):
                if c.finish_reason:
                    finished = True
                    yield chunk_cls(
                        token_ids=c.token_ids,
                        text=c.text,
                        finish_reason=c.finish_reason,
                        prompt_tokens=c.prompt_tokens,
                        completion_tokens=c.completion_tokens,
                        cached_tokens=c.cached_tokens,
                    )
                else:
                    yield chunk_cls(token_ids=c.token_ids, text=c.text)
            finished = True
        except AdapterNotFoundError as e:
            finished = True
            raise StreamAbort(grpc.StatusCode.NOT_FOUND, f"adapter {e.args[0]!r} not found") from None
        except AdapterSourceError as e:  # its weights are missing or corrupt: not the request's fault
            finished = True
            raise StreamAbort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{e} (replica {eng.info.replica_id})"
            ) from None
        except ValueError as e:
            finished = True
            raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        finally:
            if not finished:  # client cancelled or the stream broke: free the engine's slot
                eng.abort(request.request_id)

    async def LoadAdapter(self, request: epb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> Any:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter name is required")
        t0 = time.perf_counter()
        try:
            tier = await self.engine.load_adapter(request.name, request.source_uri, request.tier or "gpu")
        except AdapterNotFoundError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.name!r}: {e}")
        except (ValueError, OSError) as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot load adapter {request.name!r}: {e}"
            )
        if request.source_uri:
            self.ep.sources[request.name] = request.source_uri
        return epb.AdapterReply(name=request.name, tier=tier, load_s=time.perf_counter() - t0)

    async def UnloadAdapter(
        self, request: epb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        if not self.engine.has_adapter(request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.name!r} not found")
        tier = await self.engine.unload_adapter(request.name, request.tier)
        return epb.AdapterReply(name=request.name, tier=tier)

    async def Info(self, request: epb.InfoRequest, context: grpc.aio.ServicerContext) -> Any:
        return self.ep.info_pb()

    async def StreamEvents(self, request: epb.Subscribe, context: grpc.aio.ServicerContext) -> Any:
        ep = self.ep
        while ep.paused:  # test hook: a hung engine does not even answer a new subscription
            await asyncio.sleep(0.02)
        sub = _Subscriber()
        # Snapshot and registration happen with no await in between: consistent with later deltas.
        snap = snapshot_to_pb(
            ep.info(), self.engine.resident_blocks(), self.engine.adapters(), ep.next_seq(), time.time()
        )
        ep.subscribers.add(sub)
        try:
            await context.write(snap)
            sample_period = ep.sample_period_s
            next_sample = time.monotonic() + sample_period
            while True:
                timeout = max(0.0, next_sample - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.wake.wait(), timeout)
                if sub.events and ep.flush_period_s > 0:
                    await asyncio.sleep(ep.flush_period_s)  # coalesce a burst into one message
                sub.wake.clear()
                if ep.paused:  # test hook: an engine that stops answering
                    sub.events.clear()
                    next_sample = time.monotonic() + sample_period
                    continue
                events, sub.events = sub.events, []
                out = [event_to_pb(ev, ep.sources) for ev in events]
                now_m = time.monotonic()
                if now_m >= next_sample:
                    out.append(epb.EngineEvent(sample=sample_to_pb(self.engine.load_sample())))
                    next_sample = now_m + sample_period
                if out:
                    await context.write(epb.EngineEventBatch(seq=ep.next_seq(), events=out, time=time.time()))
        finally:
            ep.subscribers.discard(sub)


class EngineEndpoint:
    """A running gRPC endpoint for one engine. Create with :meth:`start`."""

    def __init__(
        self,
        engine: Engine,
        sample_period_s: float = 0.1,
        flush_period_s: float = 0.005,
    ) -> None:
        self.engine = engine
        self.sample_period_s = sample_period_s
        self.flush_period_s = flush_period_s
        self.subscribers: set[_Subscriber] = set()
        self.sources: dict[str, str] = {n: s for n, _, s in engine.adapters() if s}
        self.paused = False
        self.address = ""
        self.port = 0
        self._seq = 0
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._framed: FramedServer | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        sample_period_s: float = 0.1,
        flush_period_s: float = 0.005,
        tls: ServerTls | None = None,
        framed: bool = True,
    ) -> EngineEndpoint:
        """Serve ``engine`` on ``host:port`` (0 = any free port); ``advertise_host`` goes into
        ``address`` when ``host`` is a wildcard (e.g. the node IP under Ray). With ``tls`` the endpoint
        speaks TLS only (mTLS: routers must present a certificate signed by its client CA). Without TLS
        (and unless ``framed`` is False) it also serves GenerateMux on a framed TCP port (:mod:`.framed`),
        advertised to routers as ``EngineInfo.stream_address``."""
        creds = tls.grpc_credentials() if tls is not None else None
        ep = cls(engine, sample_period_s=sample_period_s, flush_period_s=flush_period_s)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        servicer = _EngineServicer(ep)
        epb_grpc.add_EngineServicer_to_server(servicer, server)
        ep._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(ep._health, server)
        addr = f"{host}:{port}"
        bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if bound == 0:
            raise OSError(f"cannot bind engine endpoint on {host}:{port}")
        await server.start()
        ep._server = server
        ep.port = bound
        adv = advertise_host or (host if host not in ("0.0.0.0", "::", "[::]", "") else "127.0.0.1")
        ep.address = f"{adv}:{bound}"
        engine.info.address = ep.address
        if framed and tls is None:  # plaintext only: with TLS, routers use GenerateMux over gRPC
            ep._framed = FramedServer(servicer.chunks)
            engine.info.stream_address = f"{adv}:{await ep._framed.start(host, 0)}"
        engine.add_event_listener(ep._on_event)
        await ep._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await ep._health.set("corral.v1.Engine", health_pb2.HealthCheckResponse.SERVING)
        log.info("engine %s serving on %s", engine.info.replica_id, ep.address)
        return ep

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (``grace`` seconds for in-flight calls; ``None`` = cancel them now)."""
        self.engine.remove_event_listener(self._on_event)
        server, self._server = self._server, None
        framed, self._framed = self._framed, None
        await asyncio.gather(  # both at once: the framed streams get the same grace as the gRPC calls
            server.stop(grace) if server is not None else asyncio.sleep(0),
            framed.close(grace) if framed is not None else asyncio.sleep(0),
        )

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # ---- events --------------------------------------------------------------------------------------
    def _on_event(self, ev: EngineEvent) -> None:
        if isinstance(ev, AdapterLoaded) and ev.adapter not in self.sources:
            for n, _, s in self.engine.adapters():
                if n == ev.adapter and s:
                    self.sources[n] = s
        for sub in self.subscribers:
            sub.events.append(ev)
            sub.wake.set()

    def pause_events(self, paused: bool = True) -> None:
        """Test hook: stop sending events and samples (a replica that stops answering)."""
        self.paused = paused

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def info(self) -> Any:
        info = self.engine.info
        info.sample_period_s = self.sample_period_s
        if self.address:
            info.address = self.address
        return info

    def info_pb(self) -> epb.EngineInfo:
        return self.info().to_pb()  # type: ignore[no-any-return]
