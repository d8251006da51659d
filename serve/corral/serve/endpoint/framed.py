"""The engine's framed TCP stream: ``GenerateMux`` without gRPC.

Each connection carries what one ``Engine.GenerateMux`` call carries (``MuxRequest`` in, ``MuxReply`` out,
served by the same :func:`~corral.serve.endpoint.mux.serve_mux`), each message behind a 4-byte
little-endian length. A write is one ``transport.write`` instead of a gRPC operation, which is what the
router's request path spends most of its CPU on otherwise. Plaintext only: an endpoint with TLS does not
open it (routers then use GenerateMux over gRPC). The address goes to routers in
``EngineInfo.stream_address``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator

from corral.v1 import engine_pb2 as epb

from .mux import ChunkSource, serve_mux

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # as the gRPC endpoint's max message


class FrameError(Exception):
    """A frame over :data:`MAX_FRAME_BYTES` (a peer that does not speak this protocol)."""


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None at a clean end of stream."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ConnectionResetError("stream ended inside a frame header") from None
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {n} bytes is over the {MAX_FRAME_BYTES} byte limit")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("stream ended inside a frame") from None


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class _Writer:
    """What :func:`serve_mux` writes to: a framed message per ``write``."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.w = writer

    async def write(self, msg: epb.MuxReply) -> None:
        self.w.write(frame(msg.SerializeToString()))
        await self.w.drain()


class FramedServer:
    """The listening socket and its connections (each one served until it ends or :meth:`close`)."""

    def __init__(self, chunks: ChunkSource) -> None:
        self.chunks = chunks
        self.server: asyncio.Server | None = None
        self.port = 0
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _requests(self, reader: asyncio.StreamReader) -> AsyncIterator[epb.MuxRequest]:
        while (data := await read_frame(reader)) is not None:
            yield epb.MuxRequest.FromString(data)
        # a router never half-closes (nor does a GenerateMux call's): its end of the connection is gone, so
        # are the replies' reader, and its requests are aborted now, not after their next chunk
        raise ConnectionResetError("the router closed the stream")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await serve_mux(self.chunks, self._requests(reader), _Writer(writer))
        except asyncio.CancelledError:
            pass  # close(): ended here (asyncio's stream callback would log a cancelled handler task)
        except (ConnectionError, FrameError) as e:
            log.info("framed stream from %s ended: %s", writer.get_extra_info("peername"), e)
        except Exception:
            log.exception("framed stream from %s failed", writer.get_extra_info("peername"))
        finally:
            self._handlers.discard(task)
            writer.close()

    async def close(self, grace: float | None = None) -> None:
        """Stop listening and end every connection (their requests are aborted in the engine), at once or
        after ``grace`` seconds (as ``grpc.aio.Server.stop``)."""
        if self.server is not None:
            self.server.close()
        if grace and self._handlers:
            await asyncio.wait(list(self._handlers), timeout=grace)
        for t in list(self._handlers):
            t.cancel()
        for t in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
