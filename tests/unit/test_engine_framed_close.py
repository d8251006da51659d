"""The engine's framed stream (corral.serve.endpoint.framed) over real TCP on 127.0.0.1: a router that
closes its connection has its requests aborted in the engine at once, as a cancelled GenerateMux call does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from corral.serve.endpoint.framed import FramedServer, frame
from corral.v1 import engine_pb2 as epb

pytestmark = pytest.mark.timeout(30)


async def test_requests_are_aborted_when_the_router_closes_the_connection() -> None:
    started = asyncio.Event()
    aborted = asyncio.Event()

    async def chunks(req: epb.GenerateRequest) -> AsyncGenerator[epb.GenerateChunk, None]:
        started.set()
        try:
            await asyncio.Event().wait()  # queued in the engine: no token yet
            yield epb.GenerateChunk()
        except (asyncio.CancelledError, GeneratorExit):
            aborted.set()
            raise

    server = FramedServer(chunks)
    port = await server.start("127.0.0.1", 0)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        msg = epb.MuxRequest()
        msg.open.add(stream=1, request=epb.GenerateRequest(request_id="r1", model="m", max_tokens=8))
        writer.write(frame(msg.SerializeToString()))
        await writer.drain()
        await asyncio.wait_for(started.wait(), 10)
        writer.close()  # the router went away (ejected the engine, restarted, ...)
        await writer.wait_closed()
        await asyncio.wait_for(aborted.wait(), 10)  # the engine stops working for nobody
    finally:
        await server.close()
