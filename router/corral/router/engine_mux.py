"""Many Generate streams over one long-lived ``Engine.GenerateMux`` call per engine (the router's side).

A gRPC call costs the router far more CPU than a message on an open call (the profile in
``docs/benchmarks/router_overhead.md``: the per-request ``Generate`` call was most of the router's time), so
:class:`MuxEngineStub` keeps one bidirectional call per engine and gives each request a stream id on it.
``MuxEngineStub.Generate(req)`` returns a :class:`MuxCall` that behaves like grpc.aio's unary-stream call
as :class:`~corral.router.server.core.Router` uses it (async iteration over ``GenerateChunk``, failures as
:class:`grpc.aio.AioRpcError` with the engine's status, ``done()``, ``cancel()`` which aborts the request in
the engine), so the request path is unchanged. Opens and cancels written while the writer is busy go out
together in one :class:`MuxRequest`; the engine batches its chunks the same way.

When the engine advertises a framed TCP stream (``EngineInfo.stream_address``; plaintext engines do, see
``corral.serve.endpoint.framed``) the same messages go over it instead of the gRPC call (:class:`_FramedCall`:
a length-prefixed message per write, no gRPC operation): cheaper per request. If it cannot be reached, the
stub forgets it and uses ``GenerateMux`` over gRPC.

When the call breaks (engine gone), every open stream fails with its status (UNAVAILABLE, ...) and the next
request opens a new call. An engine that does not implement ``GenerateMux`` (UNIMPLEMENTED) is remembered
and served with one ``Generate`` call per request, as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc

log = logging.getLogger(__name__)

_CODES: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """A grpc.StatusCode from its number (UNKNOWN for a number grpc does not know)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class MuxCall:
    """One request's stream on a multiplexed call: what ``Generate(req)`` returns."""

    __slots__ = ("_chunks", "_direct", "_direct_call", "_done", "_error", "_mux", "_req", "_sid", "_waiter")

    def __init__(self, mux: _Mux | None, sid: int, req: epb.GenerateRequest) -> None:
        self._mux = mux
        self._sid = sid
        self._req = req
        self._chunks: collections.deque[epb.GenerateChunk] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the engine ended the stream (or it was cancelled / failed)
        self._error: grpc.aio.AioRpcError | None = None
        self._direct: Any = None  # fallback: the iterator over a plain Generate call ...
        self._direct_call: Any = None  # ... and the call itself

    # ---- what the request path uses ---------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[epb.GenerateChunk]:
        return self

    async def __anext__(self) -> epb.GenerateChunk:
        while True:
            if self._direct is not None:
                return await self._direct.__anext__()  # type: ignore[no-any-return]
            if self._chunks:
                return self._chunks.popleft()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            fut = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                self._waiter = None

    def done(self) -> bool:
        if self._direct_call is not None:
            return bool(self._direct_call.done())
        return self._done

    def cancel(self) -> bool:
        """Abort the request (in the engine too). False when it had already ended."""
        if self._direct_call is not None:
            return bool(self._direct_call.cancel())
        if self._done:
            return False
        self._end(rpc_error(grpc.StatusCode.CANCELLED, "cancelled by the router"))
        if self._mux is not None:
            self._mux.cancel(self._sid)
        return True

    # ---- fed by the mux's reader ------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _push(self, chunk: epb.GenerateChunk) -> None:
        self._chunks.append(chunk)
        self._wake()

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _fall_back(self, direct: Any) -> None:
        """The engine has no GenerateMux: run this request as a plain Generate call."""
        self._direct = direct.__aiter__()
        self._direct_call = direct
        self._wake()


_HEADER = struct.Struct("<I")  # as corral.serve.endpoint.framed
MAX_FRAME_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT_S = 1.0  # then the requests waiting for it go out as plain gRPC calls


class FramedConnectError(Exception):
    """The engine's framed stream could not be reached (the stub then uses gRPC)."""


class _FramedCall:
    """GenerateMux's messages over the engine's framed TCP stream, with the grpc.aio call's interface
    that :class:`_Mux` uses (``write``, ``read`` -> message or ``grpc.aio.EOF``, ``cancel``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._conn = asyncio.ensure_future(self._connect())
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = self.address.rpartition(":")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):  # a port a firewall drops must not hang requests
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), limit=1 << 20)
        except (OSError, ValueError, TimeoutError) as e:
            raise FramedConnectError(f"engine stream {self.address}: {e or 'connect timed out'}") from None
        self._writer = writer
        return reader, writer

    async def write(self, msg: epb.MuxRequest) -> None:
        _, w = await self._conn
        data = msg.SerializeToString()
        w.write(_HEADER.pack(len(data)) + data)
        if w.transport.get_write_buffer_size() > (1 << 20):
            await w.drain()

    async def read(self) -> Any:
        reader, _ = await self._conn
        try:
            head = await reader.readexactly(_HEADER.size)
            (n,) = _HEADER.unpack(head)
            if n > MAX_FRAME_BYTES:
                raise rpc_error(grpc.StatusCode.INTERNAL, f"engine stream {self.address}: frame of {n} bytes")
            return epb.MuxReply.FromString(await reader.readexactly(n))
        except asyncio.IncompleteReadError:
            return grpc.aio.EOF
        except OSError as e:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"engine stream {self.address}: {e}") from None

    def cancel(self) -> bool:
        self._conn.cancel()
        if self._writer is not None:
            self._writer.close()
        return True


class _Mux:
    """One GenerateMux call: stream ids, the writer (batched opens/cancels) and the reader."""

    def __init__(self, stub: MuxEngineStub) -> None:
        self.stub = stub
        self.call: Any = _FramedCall(stub.stream_address) if stub.stream_address else stub.GenerateMux()
        self.streams: dict[int, MuxCall] = {}
        self.next_id = 1
        self.pending = epb.MuxRequest()
        self.has_pending = False
        self.wake = asyncio.Event()
        self.closed = False
        self.close_reason = ""  # set by aclose(reason): its streams fail with UNAVAILABLE and this message
        self.writer = asyncio.create_task(self._write(), name="corral-mux-writer")
        self.reader = asyncio.create_task(self._read(), name="corral-mux-reader")

    def open(self, req: epb.GenerateRequest) -> MuxCall:
        sid = self.next_id
        self.next_id += 1
        c = MuxCall(self, sid, req)
        self.streams[sid] = c
        self.pending.open.add(stream=sid, request=req)
        self._kick()
        return c

    def cancel(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None and not self.closed:
            self.pending.cancel.append(sid)
            self._kick()

    def _kick(self) -> None:
        self.has_pending = True
        self.wake.set()

    async def _write(self) -> None:
        call = self.call
        while True:
            await self.wake.wait()
            await asyncio.sleep(0)  # let the requests ready in this loop iteration join the write
            self.wake.clear()
            if not self.has_pending:
                continue
            msg, self.pending, self.has_pending = self.pending, epb.MuxRequest(), False
            try:
                await call.write(msg)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, FramedConnectError, OSError):
                return  # the call ended (or never started): the reader fails the streams

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError | None = None
        unreachable = False
        try:
            streams = self.streams
            call = self.call
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    error = rpc_error(grpc.StatusCode.UNAVAILABLE, "engine closed the multiplexed stream")
                    return
                for m in reply.chunks:
                    c = streams.get(m.stream)
                    if c is None:
                        continue  # cancelled here already
                    if m.HasField("chunk"):
                        c._push(m.chunk)
                    if m.end:
                        del streams[m.stream]
                        c._end(rpc_error(status_code(m.code), m.details) if m.code else None)
        except grpc.aio.AioRpcError as e:
            error = e
        except FramedConnectError as e:
            log.warning("%s: using GenerateMux over gRPC", e)
            unreachable = True
        except asyncio.CancelledError:
            if self.close_reason:
                error = rpc_error(grpc.StatusCode.UNAVAILABLE, self.close_reason)
            else:
                error = rpc_error(grpc.StatusCode.CANCELLED, "multiplexed stream closed by the router")
            raise
        except Exception as e:  # a bug: fail the streams rather than hang them
            log.exception("multiplexed stream to the engine failed")
            error = rpc_error(grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}")
        finally:
            self._close(error, unreachable)

    def _close(self, error: grpc.aio.AioRpcError | None, unreachable: bool = False) -> None:
        self.closed = True
        self.writer.cancel()
        if self.stub._mux is self:
            self.stub._mux = None
        streams, self.streams = self.streams, {}
        err = error or rpc_error(grpc.StatusCode.UNAVAILABLE, "multiplexed stream ended")
        if unreachable or err.code() == grpc.StatusCode.UNIMPLEMENTED:
            if unreachable:  # nothing was sent: these requests go out as plain calls, later ones on gRPC
                self.stub.stream_address = None
            else:
                self.stub.mux_supported = False
                log.info("engine has no GenerateMux: one Generate call per request")
            for c in streams.values():
                c._fall_back(self.stub.GenerateDirect(c._req))
            with contextlib.suppress(Exception):
                self.call.cancel()
            return
        for c in streams.values():
            c._end(err)
        with contextlib.suppress(Exception):
            self.call.cancel()

    async def aclose(self, reason: str = "") -> None:
        self.close_reason = reason
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.writer


class MuxEngineStub(epb_grpc.EngineStub):
    """:class:`EngineStub` whose ``Generate`` multiplexes requests over one ``GenerateMux`` call."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel)
        self.GenerateDirect = self.Generate  # the plain unary-stream call (fallback)
        self.Generate = self._generate  # type: ignore[assignment]
        self.mux_supported = True
        self.stream_address: str | None = None  # the engine's framed TCP stream, when it has one
        self._mux: _Mux | None = None

    def _generate(self, req: epb.GenerateRequest) -> Any:
        if not self.mux_supported:
            return self.GenerateDirect(req)
        mux = self._mux
        if mux is None:
            mux = self._mux = _Mux(self)
        return mux.open(req)

    async def aclose(self, reason: str = "") -> None:
        """End the multiplexed call: its open streams fail with CANCELLED, or with UNAVAILABLE and
        ``reason`` when one is given (the engine was ejected: the router retries or reports it)."""
        mux, self._mux = self._mux, None
        if mux is not None:
            await mux.aclose(reason)
