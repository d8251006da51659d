"""The engine's side of ``Engine.GenerateMux``: many requests' token streams over one call.

A router opens streams (``MuxRequest.open``: its stream id + a ``GenerateRequest``) and cancels them
(``MuxRequest.cancel``); each stream runs as its own task over the same chunk source ``Generate`` uses, and
the chunks every task produced since the last write go out together in one ``MuxReply``. A stream's last
``MuxChunk`` has ``end=True`` and, when it failed, the status code and message ``Generate`` would have
aborted with. When the router's call ends or is cancelled, every stream still running is cancelled, which
aborts its request in the engine (as a cancelled ``Generate`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
from corral.v1 import engine_pb2 as epb

log = logging.getLogger(__name__)


class StreamAbort(Exception):
    """A request failed with a gRPC status (Generate aborts the call with it; GenerateMux ends the stream)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


ChunkSource = Callable[[epb.GenerateRequest], AsyncGenerator[epb.GenerateChunk, None]]


async def serve_mux(chunks: ChunkSource, request_iterator: Any, context: Any) -> None:
    """Serve one GenerateMux call until the router closes its side and every stream has ended.
    ``context``: what replies are written to (``await context.write(MuxReply)``): the gRPC call's context,
    or a framed TCP stream's writer (:mod:`.framed`)."""
    reply = epb.MuxReply()
    wake = asyncio.Event()
    tasks: dict[int, asyncio.Task[None]] = {}
    state = {"reply": reply}

    def emit(sid: int, chunk: epb.GenerateChunk | None, end: bool, code: int = 0, details: str = "") -> None:
        m = state["reply"].chunks.add(stream=sid, end=end, code=code, details=details)
        if chunk is not None:
            m.chunk.CopyFrom(chunk)
        wake.set()

    async def run(sid: int, req: epb.GenerateRequest) -> None:
        ended = False
        try:
            async with contextlib.aclosing(chunks(req)) as it:
                async for c in it:
                    if not ended:
                        ended = bool(c.finish_reason)
                        emit(sid, c, ended)
            if not ended:
                ended = True
                emit(sid, None, True)
        except StreamAbort as e:
            ended = True
            emit(sid, None, True, e.code.value[0], e.details)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the engine: this stream fails, the others go on
            log.exception("request %s failed in the engine", req.request_id)
            if not ended:
                emit(sid, None, True, grpc.StatusCode.INTERNAL.value[0], f"{type(e).__name__}: {e}")
        finally:
            tasks.pop(sid, None)

    async def read() -> None:
        try:
            async for msg in request_iterator:
                for o in msg.open:
                    tasks[o.stream] = asyncio.create_task(run(o.stream, o.request))
                for sid in msg.cancel:
                    t = tasks.pop(sid, None)
                    if t is not None:
                        t.cancel()
        finally:
            wake.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await wake.wait()
            wake.clear()
            out = state["reply"]
            if out.chunks:
                state["reply"] = epb.MuxReply()
                await context.write(out)
            idle = not tasks and not state["reply"].chunks
            if reader.done() and (idle or reader.exception() is not None):
                reader.result()  # a broken request stream raises here: its streams are aborted (finally)
                return
    finally:
        reader.cancel()
        for t in list(tasks.values()):
            t.cancel()
