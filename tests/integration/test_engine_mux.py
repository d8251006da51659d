"""Engine.GenerateMux over real sockets: many requests share one call per engine (router side
:mod:`corral.router.engine_mux`, engine side :mod:`corral.serve.endpoint.mux`) and behave exactly like one
Generate call each: own chunks per stream, the engine's status codes, cancel aborts the request in the
engine, a dead engine fails the open streams and the next request opens a new call, and an engine without
GenerateMux is served with plain Generate calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from corral.router.engine_mux import MuxCall, MuxEngineStub, _FramedCall
from corral.router.tls import ServerTls
from corral.serve.endpoint import EchoEngine, EngineEndpoint, EngineRequest, TokenChunk
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc
from tls_testkit import make_certs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class SlowEngine(EchoEngine):
    """Yields one chunk, then waits for ``release`` before the last one."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        self.started.append(req.request_id)
        yield TokenChunk(token_ids=[1])
        await self.release.wait()
        yield TokenChunk(token_ids=[2], finish_reason="length", prompt_tokens=1, completion_tokens=2)


TRANSPORTS = ["grpc", "framed"]  # GenerateMux over gRPC, or over the engine's framed TCP stream


def _stub(ch: grpc.aio.Channel, ep: EngineEndpoint, transport: str) -> MuxEngineStub:
    stub = MuxEngineStub(ch)
    if transport == "framed":
        assert ep.engine.info.stream_address  # a plaintext endpoint advertises its framed stream
        stub.stream_address = ep.engine.info.stream_address
    return stub


def _req(i: int, n: int = 4, **kw: Any) -> epb.GenerateRequest:
    ids = [i + 1] * 8
    return epb.GenerateRequest(request_id=f"r{i}", model="m", prompt_token_ids=ids, max_tokens=n, **kw)


async def _collect(call: Any) -> list[int]:
    out: list[int] = []
    async for c in call:
        out.extend(c.token_ids)
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_requests_share_one_call_and_keep_their_own_chunks(transport: str) -> None:
    ep = await EngineEndpoint.start(EchoEngine(replica_id="e0", model="m"), "127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(ep.address)
    stub = _stub(ch, ep, transport)
    try:
        calls = [stub.Generate(_req(i, n=3)) for i in range(50)]
        assert all(isinstance(c, MuxCall) for c in calls)
        results = await asyncio.gather(*(_collect(c) for c in calls))
        # the echo engine answers the prompt's last max_tokens ids: each stream got its own request's
        assert results == [[i + 1] * 3 for i in range(50)]
        assert all(c.done() for c in calls)
        mux = stub._mux
        assert mux is not None and not mux.streams  # one call, every stream ended and forgotten
        assert isinstance(mux.call, _FramedCall) == (transport == "framed")
        again = await _collect(stub.Generate(_req(7, n=2)))
        assert again == [8, 8] and stub._mux is mux  # the same long-lived call serves the next one
    finally:
        await stub.aclose()
        await ch.close()
        await ep.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_engine_status_codes_come_through(transport: str) -> None:
    ep = await EngineEndpoint.start(EchoEngine(replica_id="e0", model="m"), "127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(ep.address)
    stub = _stub(ch, ep, transport)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _collect(stub.Generate(_req(1, adapter="no-such-adapter")))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-adapter" in (ei.value.details() or "")
        # the plain Generate call says the same
        with pytest.raises(grpc.aio.AioRpcError) as ej:
            await _collect(stub.GenerateDirect(_req(1, adapter="no-such-adapter")))
        assert (ej.value.code(), ej.value.details()) == (ei.value.code(), ei.value.details())
        assert await _collect(stub.Generate(_req(2, n=1))) == [3]  # the call survives a failed stream
    finally:
        await stub.aclose()
        await ch.close()
        await ep.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_aborts_the_request_in_the_engine(transport: str) -> None:
    eng = SlowEngine(replica_id="e0", model="m")
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(ep.address)
    stub = _stub(ch, ep, transport)
    try:
        call = stub.Generate(_req(1))
        first = await call.__anext__()
        assert list(first.token_ids) == [1] and not call.done()
        assert call.cancel() and call.done()
        async with asyncio.timeout(10):
            while "r1" not in eng.aborted:
                await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call.__anext__()
        assert ei.value.code() == grpc.StatusCode.CANCELLED
        # another stream on the same call runs to its end
        other = stub.Generate(_req(2))
        assert list((await other.__anext__()).token_ids) == [1]
        eng.release.set()
        assert [list(c.token_ids) async for c in other] == [[2]]
        assert "r2" not in eng.aborted and not call.cancel()
    finally:
        await stub.aclose()
        await ch.close()
        await ep.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dead_engine_fails_open_streams_and_next_request_opens_a_new_call(transport: str) -> None:
    eng = SlowEngine(replica_id="e0", model="m")
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0)
    port = ep.port
    ch = grpc.aio.insecure_channel(ep.address)
    stub = _stub(ch, ep, transport)
    try:
        call = stub.Generate(_req(1))
        await call.__anext__()
        first_mux = stub._mux
        await ep.stop(None)  # the engine goes away with a stream open
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async with asyncio.timeout(10):
                await _collect(call)
        assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        eng2 = EchoEngine(replica_id="e0", model="m")
        ep = await EngineEndpoint.start(eng2, "127.0.0.1", port)
        async with asyncio.timeout(20):
            while True:  # the channel reconnects with backoff; UNAVAILABLE until then
                try:
                    assert await _collect(stub.Generate(_req(3, n=2))) == [4, 4]
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.05)
        assert stub._mux is not first_mux
    finally:
        await stub.aclose()
        await ch.close()
        await ep.stop(0)


class _PlainServicer(epb_grpc.EngineServicer):
    """An engine from before GenerateMux: Generate only (GenerateMux answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, request: epb.GenerateRequest, context: Any) -> Any:
        self.calls += 1
        yield epb.GenerateChunk(token_ids=list(request.prompt_token_ids)[-1:], finish_reason="length")


async def test_engine_without_mux_is_served_with_plain_generate_calls() -> None:
    server = grpc.aio.server()
    plain = _PlainServicer()
    epb_grpc.add_EngineServicer_to_server(plain, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = MuxEngineStub(ch)
    try:
        results = await asyncio.gather(*(_collect(stub.Generate(_req(i))) for i in range(5)))
        assert results == [[i + 1] for i in range(5)]
        assert not stub.mux_supported
        assert await _collect(stub.Generate(_req(9))) == [10]
        assert plain.calls == 6
    finally:
        await stub.aclose()
        await ch.close()
        await server.stop(0)


async def test_unreachable_framed_stream_falls_back_to_grpc() -> None:
    ep = await EngineEndpoint.start(EchoEngine(replica_id="e0", model="m"), "127.0.0.1", 0)
    ch = grpc.aio.insecure_channel(ep.address)
    stub = MuxEngineStub(ch)
    stub.stream_address = "127.0.0.1:1"  # nothing listens there
    try:
        results = await asyncio.gather(*(_collect(stub.Generate(_req(i, n=1))) for i in range(5)))
        assert results == [[i + 1] for i in range(5)]  # sent as plain calls, nothing lost
        assert stub.stream_address is None
        assert await _collect(stub.Generate(_req(7, n=1))) == [8]
        assert stub._mux is not None and not isinstance(stub._mux.call, _FramedCall)  # gRPC from now on
    finally:
        await stub.aclose()
        await ch.close()
        await ep.stop(0)


async def test_tls_endpoint_and_opt_out_advertise_no_framed_stream(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    tls = ServerTls(certs.server_cert, certs.server_key)
    for kw in ({"framed": False}, {"tls": tls}):  # the framed stream is plaintext: never beside TLS
        ep = await EngineEndpoint.start(EchoEngine(replica_id="e0", model="m"), "127.0.0.1", 0, **kw)  # type: ignore[arg-type]
        try:
            assert ep.engine.info.stream_address == "", kw
            assert ep.info_pb().stream_address == "", kw
        finally:
            await ep.stop(0)
