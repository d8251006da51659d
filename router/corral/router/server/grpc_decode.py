"""Undecodable gRPC requests answer INVALID_ARGUMENT, not UNKNOWN.

grpc answers a request whose bytes do not parse as the method's message (random bytes, a string field with
invalid UTF-8, a truncated message) with UNKNOWN "Exception deserializing request". :class:`StrictDecoding`,
a server interceptor, swaps each method's request deserializer for one that keeps the parse error and
makes the call abort with INVALID_ARGUMENT naming the message type and the parser's reason; the servicer
never sees such a request. ``on_malformed(method)`` is told of each one (the router counts it as a 400).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .limits import clip


class Malformed:
    """A request whose bytes did not decode (in place of the message)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(decode: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def decode_or_mark(data: bytes) -> Any:
        try:
            return decode(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as e:
            why = str(e).split("': ", 1)[-1]  # without grpc's "Error parsing message with type '...'"
            return Malformed(clip(f"request does not decode as a {what} message: {why}"))

    return decode_or_mark


class StrictDecoding(grpc.aio.ServerInterceptor):
    def __init__(self, on_malformed: Callable[[str], None] | None = None) -> None:
        self.on_malformed = on_malformed
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # method -> its wrapped handler (built once)

    def _refuse(self, method: str, m: Malformed, context: grpc.aio.ServicerContext) -> Awaitable[None]:
        if self.on_malformed is not None:
            self.on_malformed(method)
        return context.abort(grpc.StatusCode.INVALID_ARGUMENT, m.reason)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        done = self._wrapped.get(method)
        if done is not None:
            return done
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None or handler.request_streaming:
            return handler
        decode = handler.request_deserializer
        what = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
        name = what.full_name if what is not None else method
        refuse = self._refuse

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await refuse(method, request, context)
                return await inner(request, context)

            return handler._replace(request_deserializer=_lenient(decode, name), unary_unary=unary)
        if handler.unary_stream is not None:
            inner_s = handler.unary_stream
            if inspect.isasyncgenfunction(inner_s):  # yields its responses

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    if isinstance(request, Malformed):
                        await refuse(method, request, context)
                    async for out in inner_s(request, context):
                        yield out

                return handler._replace(request_deserializer=_lenient(decode, name), unary_stream=stream)

            async def writes(request: Any, context: grpc.aio.ServicerContext) -> Any:  # context.write()s
                if isinstance(request, Malformed):
                    await refuse(method, request, context)
                return await inner_s(request, context)

            return handler._replace(request_deserializer=_lenient(decode, name), unary_stream=writes)
        return handler
