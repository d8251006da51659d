"""One OpenAI-compatible backend's request path, shaped like the engine's gRPC stub.

:class:`OpenAIStub` has the one method the router's dispatch loop calls on an engine stub,
``Generate(GenerateRequest)``, returning a call object that is async-iterable over
:class:`~corral.v1.engine_pb2.GenerateChunk` and has ``done()`` / ``cancel()``. Behind it is a streamed
``POST /v1/completions`` (``stream_options.include_usage``) with the prompt as the client sent it (text or
token ids), or, for a chat request (:data:`CHAT_MESSAGES`), ``POST /v1/chat/completions`` with the client's
messages, so the backend applies its own chat template; the model is the base model or the adapter name.
So the router's retry, quarantine, accounting and error mapping work unchanged:

=============================================  ===========================  ==============================
backend answer                                  raised as                    the client gets
=============================================  ===========================  ==============================
400 / 422 (a bad field)                         ``INVALID_ARGUMENT``         400, the backend's message
404 (unknown model or adapter)                  ``NOT_FOUND``                404
429, 5xx, refused / reset / timed out           ``UNAVAILABLE``              retried on another backend
                                                                             (quarantined), else 503
an ``error`` event or a drop after a token      ``UNAVAILABLE``              502 / a final error event
=============================================  ===========================  ==============================

An adapter the backend has not loaded is loaded first with ``POST /v1/load_lora_adapter`` from its source
(``file://PATH`` -> ``PATH``, ``hf://REPO`` -> ``REPO``, anything else as given), once per backend at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
import grpc
import orjson
from corral.v1 import engine_pb2 as epb

log = logging.getLogger(__name__)


CHAT_MESSAGES: ContextVar[list[dict[str, Any]] | None] = ContextVar("corral_chat_messages", default=None)
"""Set by the HTTP front while it serves a chat request: the backend then gets the client's messages on
``/v1/chat/completions`` and applies its own chat template (the router's rendering only routes)."""


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code the router's dispatch loop understands for a backend's HTTP error status."""
    if http_status in (400, 422):
        return grpc.StatusCode.INVALID_ARGUMENT
    if http_status == 404:
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.UNAVAILABLE


def lora_path(source: str) -> str:
    """An adapter source URI -> what vLLM's ``lora_path`` takes (a local path or a Hugging Face repo id)."""
    for scheme in ("file://", "hf://"):
        if source.startswith(scheme):
            return source[len(scheme) :]
    return source


def error_message(body: bytes, status: int) -> str:
    """The message of an OpenAI-shaped (or vLLM / SGLang plain) error body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        if isinstance(err, str):
            return err[:500]
        if "detail" in data:
            return str(data["detail"])[:500]
    return str(data)[:500]


class OpenAIStub:
    """``Generate`` over one backend's OpenAI HTTP API (see the module docstring)."""

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        loaded: Callable[[str], bool],
        on_loaded: Callable[[str, str], None],
        connect_timeout_s: float = 2.0,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._loaded = loaded
        self._on_loaded = on_loaded
        self._on_lost = on_lost  # an adapter we thought loaded is not (the backend restarted or unloaded it)
        self._locks: dict[str, asyncio.Lock] = {}
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)

    def Generate(self, req: epb.GenerateRequest) -> OpenAICall:
        return OpenAICall(self, req)

    async def ensure_adapter(self, name: str, source: str) -> None:
        """Load adapter ``name`` on this backend unless it is loaded (one load at a time per adapter)."""
        if self._loaded(name):
            return
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self._loaded(name):
                return
            if not source:
                raise rpc_error(
                    grpc.StatusCode.NOT_FOUND,
                    f"adapter '{name}' is not loaded on backend {self.url} and has no source to load it "
                    "from (ModelPool spec.adapters[].source)",
                )
            body = {"lora_name": name, "lora_path": lora_path(source)}
            try:
                async with self._session().post(
                    f"{self.url}/v1/load_lora_adapter", json=body, timeout=self.timeout
                ) as r:
                    text = await r.read()
                    if r.status >= 400 and b"already" not in text:
                        msg = error_message(text, r.status)
                        # 4xx: the adapter (its source) is at fault, not the backend: tried elsewhere, the
                        # backend stays in routing; 5xx: the backend is (quarantined, like a refused call)
                        code = (
                            grpc.StatusCode.FAILED_PRECONDITION
                            if r.status < 500
                            else grpc.StatusCode.UNAVAILABLE
                        )
                        raise rpc_error(code, f"backend {self.url} could not load adapter '{name}': {msg}")
            except (aiohttp.ClientError, TimeoutError) as e:
                raise rpc_error(
                    grpc.StatusCode.UNAVAILABLE, f"backend {self.url}: loading adapter '{name}': {e!r}"
                ) from None
            self._on_loaded(name, source)


def request_body(req: epb.GenerateRequest, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``/v1/completions`` body for an engine request (``/v1/chat/completions`` with ``messages``)."""
    body: dict[str, Any] = {"model": req.adapter or req.model}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = req.prompt if req.prompt else list(req.prompt_token_ids)
    body.update({
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    if req.HasField("sampling"):
        s = req.sampling
        body["temperature"] = s.temperature
        body["top_p"] = s.top_p
        if s.top_k:
            body["top_k"] = s.top_k
        if s.seed:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.ignore_eos:
            body["ignore_eos"] = True
    return body


class OpenAICall:
    """One streamed completion; iterate for chunks. The finish chunk carries the usage."""

    def __init__(self, stub: OpenAIStub, req: epb.GenerateRequest) -> None:
        self.stub = stub
        self.req = req
        self._resp: aiohttp.ClientResponse | None = None
        self._it = self._run()
        self._done = False

    def __aiter__(self) -> OpenAICall:
        return self

    async def __anext__(self) -> epb.GenerateChunk:
        try:
            return await self._it.__anext__()
        except BaseException:
            self._done = True
            raise

    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Abandon the stream: close the HTTP response (the backend sees the client go away)."""
        if self._done:
            return
        self._done = True
        if self._resp is not None:
            self._resp.close()
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._it.aclose())

    async def _run(self) -> AsyncGenerator[epb.GenerateChunk, None]:
        stub, req = self.stub, self.req
        messages = CHAT_MESSAGES.get()
        url = f"{stub.url}/v1/{'chat/completions' if messages is not None else 'completions'}"
        data = orjson.dumps(request_body(req, messages))
        for attempt in (1, 2):
            if req.adapter:
                await stub.ensure_adapter(req.adapter, req.adapter_source)
            try:
                resp = await stub._session().post(
                    url,
                    data=data,
                    timeout=stub.timeout,
                    headers={"x-request-id": req.request_id, "Content-Type": "application/json"},
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"backend {stub.url}: {e!r}") from None
            lost = resp.status == 404 and req.adapter and req.adapter_source and stub._on_lost is not None
            if attempt == 1 and lost:  # the adapter is gone there (a restart, an unload): load it again, once
                resp.release()
                assert stub._on_lost is not None
                stub._on_lost(req.adapter)
                continue
            break
        self._resp = resp
        try:
            if resp.status >= 400:
                msg = error_message(await resp.read(), resp.status)
                raise rpc_error(status_code(resp.status), f"backend {stub.url} answered {resp.status}: {msg}")
            pending: epb.GenerateChunk | None = None  # the finish chunk, held for the usage event
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                ev = orjson.loads(data)
                if "error" in ev:
                    err = ev["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"backend {stub.url}: {msg}")
                usage = ev.get("usage")
                if usage and pending is not None:
                    _set_usage(pending, usage)
                for ch in ev.get("choices") or ():
                    text = ch.get("text")
                    if text is None:
                        text = (ch.get("delta") or {}).get("content") or ""
                    fin = ch.get("finish_reason") or ""
                    chunk = epb.GenerateChunk(text=text, finish_reason=fin)
                    if fin:
                        if usage:
                            _set_usage(chunk, usage)
                        pending = chunk
                    else:
                        yield chunk
            if pending is not None:
                yield pending
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"backend {stub.url}: stream broke: {e!r}") from None
        finally:
            resp.release()


def _set_usage(chunk: epb.GenerateChunk, usage: dict[str, Any]) -> None:
    chunk.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    chunk.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    chunk.cached_tokens = int(details.get("cached_tokens") or 0)
