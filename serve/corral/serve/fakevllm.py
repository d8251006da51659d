"""Fake vLLM-shaped OpenAI workers (aiohttp) for tests and ``corral bench peers``: no GPU, no model.

One :class:`FakeVllm` is an HTTP server that answers like a vLLM OpenAI server for routing purposes:

- ``POST /v1/completions`` and ``/v1/chat/completions`` (JSON or SSE with ``stream_options.include_usage``),
  OpenAI-shaped errors (400 bad field, 404 unknown model / adapter, 503 while marked unhealthy);
- ``GET /v1/models`` (the base model, then loaded LoRA adapters with ``parent``), ``GET /health``;
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (plain-text 200 like vLLM; 400 when already
  loaded, 404 when unloading an unknown one);
- ``GET /metrics`` in Prometheus text with vLLM's names: ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries`` /
  ``vllm:prefix_cache_hits`` (tokens), ``vllm:cache_config_info`` (block size, block count);
- ``GET /fake/stats`` (JSON counters for benchmarks) and ``POST /fake/reset``.

The prompt is tokenized with the simulator's tokenizer (4 bytes per token) and cut into chained block hashes
salted by adapter; a bounded LRU of blocks is the prefix cache. At most ``max_running`` requests are admitted
at once; prefills run one at a time in arrival order (the GPU's compute), each taking ``prefill_base_s +
prefill_s_per_token`` x its *uncached* tokens (the cache is looked up when it starts), then output tokens come
every ``decode_s_per_token`` (decodes overlap). Requests not yet in their prefill count as ``waiting``.
Several workers can share one event loop (:func:`serve_many`); ``python -m corral.serve.fakevllm --workers N``
runs N of them in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from corral.router.hashing import block_hashes, salt_for
from corral.router.tokenizer import SIM_TOKENIZER

_BAD = "BadRequestError"


@dataclass
class FakeVllmConfig:
    """How one fake worker behaves (defaults: an H100-ish Llama-8B, seconds per token)."""

    model: str = "llama-8b"
    block_size: int = 16
    cache_blocks: int = 4096  # prefix-cache capacity (LRU)
    max_running: int = 8  # concurrency limit; the rest wait
    prefill_base_s: float = 0.002
    prefill_s_per_token: float = 17.3e-6  # the H100 profile's b1 (Llama-3.1-8B)
    decode_s_per_token: float = 0.002
    max_model_len: int = 32768
    adapters: dict[str, str] = field(default_factory=dict)  # preloaded LoRA adapters: name -> path
    lora_load_s: float = 0.05
    kv_events_port: int = 0  # > 0: publish vLLM-style KV events on a ZMQ PUB socket (tcp://HOST:PORT)
    abort_after_tokens: int = 0  # > 0: a stream's connection is dropped after this many tokens (a crash)
    lora_paths: tuple[str, ...] | None = None  # the adapters on this host's disk (None: any path loads)
    api_key: str | None = None  # like vLLM --api-key: /v1/* needs 'Authorization: Bearer KEY'


class FakeVllm:
    """One fake vLLM OpenAI server (see the module docstring)."""

    def __init__(self, config: FakeVllmConfig | None = None, name: str = "") -> None:
        self.cfg = cfg = config or FakeVllmConfig()
        self.name = name or f"fake-{uuid.uuid4().hex[:6]}"
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.adapters: dict[str, str] = dict(cfg.adapters)
        self.healthy = True
        self.running = 0
        self.waiting = 0
        self.running_blocks = 0
        self._slots = asyncio.Semaphore(cfg.max_running)
        self._prefill = asyncio.Lock()
        self.counters: dict[str, int] = {}
        self.reset()
        self.app = web.Application(client_max_size=64 << 20, middlewares=[self._auth])
        r = self.app.router
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_post("/v1/load_lora_adapter", self.load_lora)
        r.add_post("/v1/unload_lora_adapter", self.unload_lora)
        r.add_get("/fake/stats", self.stats)
        r.add_post("/fake/reset", self.reset_handler)
        self.runner: web.AppRunner | None = None
        self._pub: Any = None  # the KV events' ZMQ PUB socket
        self._seq = 0
        self.url = ""
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port or self.port, backlog=1024, reuse_address=True)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        if self.cfg.kv_events_port and self._pub is None:
            import zmq

            self._pub = zmq.Context.instance().socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(f"tcp://{host}:{self.cfg.kv_events_port}")
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None

    # ---- vLLM-style KV events: its own hash space (not the router's), BlockStored / BlockRemoved ---------
    @staticmethod
    def vllm_hash(h: int) -> int:
        return int.from_bytes(hashlib.sha256(h.to_bytes(8, "little")).digest()[:8], "big")

    def _publish(self, events: list[list[Any]]) -> None:
        if self._pub is None or not events:
            return
        import msgpack
        import zmq

        payload = msgpack.packb([time.time(), events, 0])
        self._seq += 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([b"", self._seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

    def _stored_event(self, hashes: Sequence[int], ids: Sequence[int], adapter: str | None) -> list[Any]:
        bs = self.cfg.block_size
        vh = [self.vllm_hash(h) for h in hashes]
        return ["BlockStored", vh, None, list(ids[: len(hashes) * bs]), bs, None, "GPU", adapter]

    def reset(self) -> None:
        """Zero the counters and empty the prefix cache (adapters stay loaded)."""
        self.cache.clear()
        self.counters = dict.fromkeys(
            (
                "requests",
                "chat_requests",
                "prompt_tokens",
                "cached_tokens",
                "generated_tokens",
                "lora_loads",
                "errors",
            ),
            0,
        )

    # ---- the engine -------------------------------------------------------------------------------------
    def _lookup(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def _store(self, hashes: Sequence[int]) -> None:
        cache = self.cache
        for h in reversed(hashes):  # tail first: LRU evicts tails before their prefixes
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
        evicted = []
        while len(cache) > self.cfg.cache_blocks:
            evicted.append(cache.popitem(last=False)[0])
        if evicted and self._pub is not None:
            self._publish([["BlockRemoved", [self.vllm_hash(h) for h in evicted], "GPU"]])

    async def _generate(self, ids: list[int], adapter: str | None, n: int) -> AsyncGenerator[Any, None]:
        """Yield ``("first", cached_tokens)`` after the prefill, then one ``("tok", i)`` per output token."""
        cfg = self.cfg
        hashes = block_hashes(ids, cfg.block_size, salt_for(adapter))
        self.waiting += 1
        started = False
        try:
            await self._slots.acquire()
        except BaseException:
            self.waiting -= 1
            raise
        self.running_blocks += len(hashes) + 1
        try:
            async with self._prefill:  # one prefill at a time (the GPU's compute), in arrival order
                self.waiting -= 1
                self.running += 1
                started = True
                cached_blocks = self._lookup(hashes)  # looked up when the prefill starts
                cached = cached_blocks * cfg.block_size
                self._store(hashes[:cached_blocks])  # touched now; new blocks count once computed
                c = self.counters
                c["requests"] += 1
                c["prompt_tokens"] += len(ids)
                c["cached_tokens"] += cached
                await asyncio.sleep(cfg.prefill_base_s + cfg.prefill_s_per_token * (len(ids) - cached))
                self._store(hashes)
                if self._pub is not None and hashes:  # like vLLM, also for reused blocks
                    self._publish([self._stored_event(hashes, ids, adapter)])
            yield "first", cached
            for i in range(n):
                if i:
                    await asyncio.sleep(cfg.decode_s_per_token)
                c["generated_tokens"] += 1
                yield "tok", i
        finally:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
            self.running_blocks -= len(hashes) + 1
            self._slots.release()

    # ---- HTTP -----------------------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.cfg.api_key
        if (
            key
            and request.path.startswith("/v1/")
            and request.headers.get("Authorization") != f"Bearer {key}"
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @staticmethod
    def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return web.json_response(body, status=status)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"malformed JSON body: {e}", "BadRequestError")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object", "BadRequestError")
        return body

    def _resolve(self, body: dict[str, Any]) -> tuple[str | None, web.Response | None]:
        """The adapter named by ``model`` (None = base model), or a 404 like vLLM's."""
        model = body.get("model")
        if model in (None, self.cfg.model):
            return None, None
        if model in self.adapters:
            return str(model), None
        msg = f"The model `{model}` does not exist."
        return None, self._error(404, msg, "NotFoundError", "model")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.healthy:
            return self._error(503, "worker is unhealthy", "ServiceUnavailableError")
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        adapter, err = self._resolve(body)
        if err is not None:
            return err
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return self._error(400, "field 'messages' must be a non-empty list", _BAD, "messages")
            text = "".join(f"<|{m.get('role')}|>\n{m.get('content') or ''}\n" for m in msgs)
            text += "<|assistant|>\n"
            ids = SIM_TOKENIZER.encode(text)
            self.counters["chat_requests"] += 1
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = list(prompt)
            elif isinstance(prompt, str) and prompt:
                ids = SIM_TOKENIZER.encode(prompt)
            else:
                return self._error(400, "field 'prompt' must be a non-empty string or token ids", _BAD,
                                   "prompt")  # fmt: skip
        mt = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(mt, int) or mt < 1:
            return self._error(400, f"field 'max_tokens' must be >= 1 (got {mt!r})", _BAD, "max_tokens")
        if len(ids) + mt > self.cfg.max_model_len:
            msg = (f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you "
                   f"requested {len(ids) + mt} tokens.")  # fmt: skip
            return self._error(400, msg, "BadRequestError", "prompt")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model") or self.cfg.model}  # fmt: skip
        gen = self._generate(ids, adapter, mt)
        if not body.get("stream"):
            cached = 0
            n = 0
            async for kind, v in gen:
                if kind == "first":
                    cached = v
                else:
                    n += 1
            text = " t" * n
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            )
            obj = "chat.completion" if chat else "text_completion"
            return web.json_response(
                {**head, "object": obj, "choices": [choice], "usage": _usage(len(ids), n, cached)}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cached = 0
        n = 0
        try:
            async for kind, v in gen:
                if kind == "first":
                    cached = v
                    continue
                n += 1
                fin = "length" if n == mt else None
                choice = (
                    {"index": 0, "delta": {"content": " t"}, "finish_reason": fin}
                    if chat
                    else {"index": 0, "text": " t", "logprobs": None, "finish_reason": fin}
                )
                await resp.write(b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n")
                if self.cfg.abort_after_tokens and n >= self.cfg.abort_after_tokens and request.transport:
                    request.transport.close()  # mid-stream, like a worker that died
                    await gen.aclose()
                    return resp
            so = body.get("stream_options") or {}
            if so.get("include_usage"):
                u: dict[str, Any] = {**head, "choices": [], "usage": _usage(len(ids), n, cached)}
                await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            await gen.aclose()
            raise
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.cfg
        data = [{"id": cfg.model, "object": "model", "created": 0, "owned_by": "vllm", "root": cfg.model,
                 "parent": None, "max_model_len": cfg.max_model_len}]  # fmt: skip
        for name, path in self.adapters.items():
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "vllm", "root": path,
                         "parent": cfg.model, "max_model_len": None})  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        cfg = self.cfg
        lbl = f'{{engine="0",model_name="{cfg.model}"}}'
        c = self.counters
        usage = min(1.0, self.running_blocks / max(1, cfg.cache_blocks))
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{lbl} {self.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{lbl} {self.waiting}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{lbl} {usage}",
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{lbl} {c['prompt_tokens']}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{lbl} {c['cached_tokens']}",
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{cfg.block_size}",'
            f'num_gpu_blocks="{cfg.cache_blocks}"}} 1.0',
        ]
        if self.adapters:
            names = ",".join(self.adapters)
            lines += [
                "# TYPE vllm:lora_requests_info gauge",
                f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{names}",'
                f'waiting_lora_adapters=""}} {time.time()}',
            ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError")
        if name in self.adapters:
            return self._error(400, f"The lora adapter '{name}' has already been loaded.", "BadRequestError")
        if self.cfg.lora_paths is not None and path not in self.cfg.lora_paths:
            msg = f"Loading lora {name} failed: No adapter found for {path}"
            return self._error(400, msg, "BadRequestError")
        await asyncio.sleep(self.cfg.lora_load_s)
        self.adapters[str(name)] = str(path)
        self.counters["lora_loads"] += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("lora_name")
        if name not in self.adapters:
            return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.name, "url": self.url, **self.counters,
                                  "adapters": sorted(self.adapters)})  # fmt: skip

    async def reset_handler(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


async def serve_many(n: int, config: FakeVllmConfig, host: str = "127.0.0.1") -> list[FakeVllm]:
    """Start ``n`` workers on free ports in this event loop."""
    workers = [FakeVllm(config, name=f"w{i}") for i in range(n)]
    for w in workers:
        await w.start(host)
    return workers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.serve.fakevllm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--config", default="{}", help="FakeVllmConfig fields as JSON")
    ap.add_argument("--host", default="127.0.0.1")
    ns = ap.parse_args(argv)
    cfg = FakeVllmConfig(**json.loads(ns.config))

    async def run() -> None:
        ws = await serve_many(ns.workers, cfg, ns.host)
        print(json.dumps({"urls": [w.url for w in ws]}), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
