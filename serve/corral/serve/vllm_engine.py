"""The vLLM engine behind the engine endpoint (optional extra ``corral[vllm]``; GPU machines only).

:class:`VllmEngine` embeds vLLM 0.33's ``AsyncLLM`` (``vllm.v1.engine.async_llm``) in the engine replica
and satisfies the same :class:`corral.serve.endpoint.Engine` protocol as the simulator:

- **generate**: ``AsyncLLM.generate(prompt, sampling_params, request_id, *, prompt_text=...,
  lora_request=...)`` with ``TokensPrompt(prompt_token_ids=...)`` (the router already tokenized, with this
  model's tokenizer, so vLLM's blocks are the router's blocks) and the text alongside, or the text prompt
  alone, and
  ``SamplingParams(output_kind=RequestOutputKind.DELTA)`` so each output carries only new tokens;
  ``abort(request_id)`` when the client goes away.
- **adapters**: ``add_lora(LoRARequest(lora_name, lora_int_id, lora_path))`` and
  ``remove_lora(lora_int_id)`` on the engine itself. The OpenAI server's ``/v1/unload_lora_adapter`` only
  forgets the name and never evicts (vllm/entrypoints/serve/lora/api_router.py in vLLM 0.33), so it
  is not used. vLLM keeps added adapters in a
  CPU LRU of ``max_cpu_loras`` and evicts silently past it; this wrapper keeps its own LRU of the same
  size and removes the oldest itself, so the residency it reports (and the router's view) stays true.
  vLLM has no explicit CPU->GPU promotion call: an added adapter is activated into one of ``max_loras``
  GPU slots by the first batch that uses it (a fast CPU->GPU copy), so a ``gpu`` load is reported as
  ``gpu`` once added.
- **KV events**: ``kv_events_config`` with a ZMQ publisher on a free loopback port; a subscriber task
  decodes ``KVEventBatch`` (msgpack ``[ts, events, dp_rank]``) and :class:`KvEventTranslator` maps vLLM's
  block hashes onto Corral's chained xxhash space (recomputed from each ``BlockStored``'s token ids and
  its LoRA name), so the router's precise prefix index works unchanged.
- **tokenizer**: the engine reports where vLLM loaded its tokenizer from (``model_config.tokenizer``: a
  local folder, or a hub id resolved to its local snapshot; nothing is downloaded) as
  ``EngineInfo.tokenizer``, which the router loads unless the ModelPool names one.
- **load samples**: vLLM's own Prometheus gauges (``vllm:num_requests_running`` / ``waiting``,
  ``vllm:kv_cache_usage_perc``) read from the in-process registry, falling back to this wrapper's counts.

``import corral.serve.vllm_engine`` never imports vLLM; :func:`import_vllm` does, on first use, and
raises :class:`VllmNotInstalled` with the install hint when it is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.router.events import (
    AdapterLoaded,
    AdapterUnloaded,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    LoadSample,
)
from corral.router.hashing import root_seed, salt_for
from corral.router.wire import EngineInfo
from corral.serve.adapter_sources import fetch_adapter

from .endpoint.engine import AdapterNotFoundError, EngineEventSource, EngineRequest, TokenChunk

log = logging.getLogger(__name__)

INSTALL_HINT = "engine: vllm needs the optional extra: pip install 'corral[vllm]' (on a GPU machine)"


class VllmNotInstalled(ImportError):
    """vLLM is not importable in this environment."""


@dataclass(frozen=True, slots=True)
class VllmApi:
    """The vLLM names this module uses (real ones, or a test double injected via ``sys.modules``)."""

    AsyncLLM: Any
    AsyncEngineArgs: Any
    SamplingParams: Any
    RequestOutputKind: Any
    LoRARequest: Any
    TokensPrompt: Any
    KVEventsConfig: Any


def import_vllm() -> VllmApi:
    try:
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise VllmNotInstalled(f"{INSTALL_HINT} ({e})") from e
    return VllmApi(
        AsyncLLM,
        AsyncEngineArgs,
        SamplingParams,
        RequestOutputKind,
        LoRARequest,
        TokensPrompt,
        KVEventsConfig,
    )


def tokenizer_location(llm: Any, base_model: str, engine_args: Mapping[str, Any] | None = None) -> str:
    """Where vLLM loaded its tokenizer from, as a local path the router can load (``EngineInfo.tokenizer``):
    ``model_config.tokenizer`` when it is a folder or file, else a hub id's snapshot in the local Hugging
    Face cache (already downloaded by vLLM; nothing is fetched), else the name as vLLM has it."""
    from pathlib import Path

    name, revision = "", None
    with contextlib.suppress(Exception):
        mc = llm.vllm_config.model_config
        name = str(mc.tokenizer or "")
        revision = getattr(mc, "tokenizer_revision", None)
    name = name or str((engine_args or {}).get("tokenizer") or "") or base_model
    p = Path(name).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return str(p.resolve())
    if p.is_file():
        return str(p.resolve())
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "tokenizer.json", revision=revision)
        if isinstance(hit, str):
            return str(Path(hit).parent)
    log.warning("vLLM tokenizer %r is not a local tokenizer.json: routers cannot load it", name)
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- KV events ---------------------------------------------------------------------------------------


class KvEventTranslator:
    """vLLM KV events -> Corral :mod:`corral.router.events` with Corral block hashes.

    vLLM hashes blocks with its own chain (sha256 over pickle/cbor, or xxhash, seeded per config) and
    publishes only the low 64 bits. The router hashes prompts with :mod:`corral.router.hashing`. Rather
    than reimplementing vLLM's hash, each ``BlockStored`` is rehashed: it carries the stored blocks'
    ``token_ids``, their ``block_size``, the ``parent_block_hash`` and the ``lora_name``, so the Corral
    hash of block i is ``xxh3_64(tokens_i, seed=corral(parent))``, the root seeded by the adapter salt.
    A map vLLM-hash -> Corral-hash lets ``BlockRemoved`` be translated too.
    """

    def __init__(self, replica_id: str, block_size: int) -> None:
        import xxhash

        self._xxh = xxhash.xxh3_64_intdigest
        self.replica_id = replica_id
        self.block_size = block_size
        self.map: dict[Any, int] = {}

    @staticmethod
    def _key(h: Any) -> Any:
        if isinstance(h, bytes):
            return int.from_bytes(h[-8:], "big")
        return h

    def translate(self, ev: Mapping[str, Any]) -> EngineEvent | None:
        import numpy as np

        kind = ev.get("type")
        if kind == "BlockStored":
            hashes = list(ev.get("block_hashes") or [])
            tokens = list(ev.get("token_ids") or [])
            bs = int(ev.get("block_size") or self.block_size)
            if bs != self.block_size:
                log.warning("vLLM block_size %s != routing blockSize %s", bs, self.block_size)
            parent = ev.get("parent_block_hash")
            if parent is not None and self._key(parent) in self.map:
                seed = self.map[self._key(parent)]
            elif parent is None:
                seed = root_seed(salt_for(ev.get("lora_name") or None))
            else:
                return None  # parent unknown (evicted or before we subscribed): cannot chain
            out = []
            for i, h in enumerate(hashes):
                block = tokens[i * bs : (i + 1) * bs]
                if len(block) < bs:
                    break
                seed = self._xxh(np.asarray(block, dtype=np.uint32).tobytes(), seed)
                self.map[self._key(h)] = seed
                out.append(seed)
            return BlockStored(self.replica_id, tuple(out)) if out else None
        if kind == "BlockRemoved":
            gone = [
                self.map.pop(self._key(h)) for h in ev.get("block_hashes") or [] if self._key(h) in self.map
            ]
            return BlockRemoved(self.replica_id, tuple(gone)) if gone else None
        if kind == "AllBlocksCleared":
            self.map.clear()
            return AllBlocksCleared(self.replica_id)
        return None

    def resident(self) -> list[int]:
        return list(self.map.values())


# ---- the engine --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Adapter:
    name: str
    int_id: int
    source: str
    path: str = ""
    tier: str = "disk"  # gpu / cpu / disk (known, not in the engine)


class VllmEngine(EngineEventSource):
    """An ``Engine`` over vLLM's ``AsyncLLM``. Build with :meth:`create` (starts vLLM)."""

    def __init__(
        self,
        api: VllmApi,
        llm: Any,
        info: EngineInfo,
        adapter_cache_dir: str,
        kv_endpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.api = api
        self.llm = llm
        self._info = info
        self._cache_dir = adapter_cache_dir
        self._adapters: dict[str, _Adapter] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # adapters added to vLLM, oldest first
        self._next_id = 1
        self._lock = asyncio.Lock()
        self._running: set[str] = set()
        self._waiting: set[str] = set()
        self._kv = KvEventTranslator(info.replica_id, info.block_size)
        self._kv_endpoint = kv_endpoint
        self._kv_task: asyncio.Task[None] | None = None
        self.healthy = True

    @classmethod
    async def create(
        cls,
        *,
        replica_id: str,
        model: str,
        base_model: str,
        gpu_class: str,
        profile: str,
        block_size: int = 16,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        max_model_len: int | None = None,  # None: vLLM's default (the model's own context length)
        max_lora_rank: int = 16,
        engine_args: Mapping[str, Any] | None = None,
        adapter_cache_dir: str | None = None,
        kv_events: bool = True,
        api: VllmApi | None = None,
    ) -> VllmEngine:
        api = api or import_vllm()
        kv_port = _free_port() if kv_events else None
        kw: dict[str, Any] = {
            "model": base_model,
            "served_model_name": [model],
            "block_size": block_size,
            "enable_prefix_caching": True,
            "enable_lora": True,
            "max_loras": max_loras,
            "max_cpu_loras": max(max_cpu_loras, max_loras),
            "max_lora_rank": max_lora_rank,
        }
        if kv_port is not None:
            kw["kv_events_config"] = api.KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                endpoint=f"tcp://127.0.0.1:{kv_port}",
                topic="kv",
            )
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        kw.update(engine_args or {})
        llm = api.AsyncLLM.from_engine_args(api.AsyncEngineArgs(**kw))
        with contextlib.suppress(Exception):  # the limit vLLM settled on (the model's, when not given)
            max_model_len = int(llm.vllm_config.model_config.max_model_len) or max_model_len
        kv_cap = 0
        with contextlib.suppress(Exception):
            kv_cap = int(llm.vllm_config.cache_config.num_gpu_blocks or 0)
        info = EngineInfo(
            replica_id=replica_id,
            model=model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            kv_capacity_blocks=kv_cap,
            max_loras=max_loras,
            max_cpu_loras=max(max_cpu_loras, max_loras),
            max_model_len=max_model_len or 0,  # 0: unknown (the router then checks no length)
            engine="vllm",
            tokenizer=tokenizer_location(llm, base_model, kw),
        )
        eng = cls(
            api,
            llm,
            info,
            adapter_cache_dir or tempfile.mkdtemp(prefix="corral-adapters-"),
            kv_endpoint=f"tcp://127.0.0.1:{kv_port}" if kv_port else None,
        )
        if eng._kv_endpoint:
            eng._kv_task = asyncio.create_task(eng._kv_loop(), name="corral-vllm-kv-events")
        return eng

    @property
    def info(self) -> EngineInfo:
        return self._info

    # -- requests --
    def _sampling(self, req: EngineRequest) -> Any:
        return self.api.SamplingParams(
            n=1,
            max_tokens=max(1, req.max_tokens),
            temperature=req.temperature,
            top_p=req.top_p if req.top_p > 0 else 1.0,
            top_k=req.top_k if req.top_k > 0 else 0,
            seed=req.seed or None,
            stop=list(req.stop) or None,
            ignore_eos=req.ignore_eos,
            output_kind=self.api.RequestOutputKind.DELTA,
        )

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        lora = None
        if req.adapter:
            a = self._adapters.get(req.adapter)
            if a is None:
                if not req.adapter_source:
                    raise AdapterNotFoundError(req.adapter)
                await self.load_adapter(req.adapter, req.adapter_source, "gpu")
                a = self._adapters[req.adapter]
            elif a.tier == "disk":
                await self.load_adapter(a.name, a.source, "gpu")
            self._lru.move_to_end(a.name)
            lora = self.api.LoRARequest(lora_name=a.name, lora_int_id=a.int_id, lora_path=a.path)
        if req.prompt_token_ids:
            if self._info.max_model_len and len(req.prompt_token_ids) >= self._info.max_model_len:
                raise ValueError(
                    f"prompt of {len(req.prompt_token_ids)} tokens exceeds "
                    f"max_model_len {self._info.max_model_len}"
                )
            prompt: Any = self.api.TokensPrompt(prompt_token_ids=list(req.prompt_token_ids))
            text = req.prompt or None  # the router's text of those ids (for vLLM's outputs)
        elif req.prompt:
            prompt, text = req.prompt, None
        else:
            raise ValueError("empty prompt")

        rid = req.request_id
        self._waiting.add(rid)
        completion = 0
        try:
            gen = self.llm.generate(prompt, self._sampling(req), rid, prompt_text=text, lora_request=lora)
            async for out in gen:
                if rid in self._waiting:
                    self._waiting.discard(rid)
                    self._running.add(rid)
                o = out.outputs[0] if out.outputs else None
                toks = list(o.token_ids) if o is not None else []
                completion += len(toks)
                chunk = TokenChunk(token_ids=toks, text=o.text if o is not None else "")
                if out.finished:
                    chunk.finish_reason = (o.finish_reason if o is not None else None) or "stop"
                    chunk.prompt_tokens = len(out.prompt_token_ids or req.prompt_token_ids or [])
                    chunk.completion_tokens = completion
                    chunk.cached_tokens = int(getattr(out, "num_cached_tokens", 0) or 0)
                yield chunk
        finally:
            self._waiting.discard(rid)
            self._running.discard(rid)

    def abort(self, request_id: str) -> None:
        if request_id in self._running or request_id in self._waiting:
            task = asyncio.ensure_future(self.llm.abort(request_id))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # -- adapters --
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    async def load_adapter(self, name: str, source_uri: str, tier: str = "gpu") -> str:
        tier = tier or "gpu"
        async with self._lock:
            a = self._adapters.get(name)
            if a is None or (source_uri and source_uri != a.source):
                art = await asyncio.to_thread(fetch_adapter, name, source_uri, self._cache_dir)
                if a is not None and a.tier != "disk":
                    await self._remove(a)
                a = _Adapter(name, self._next_id, source_uri, str(art.path))
                self._next_id += 1
                self._adapters[name] = a
            if a.tier == "disk":
                while len(self._lru) >= self._info.max_cpu_loras:
                    victim = self._adapters[next(iter(self._lru))]
                    await self._remove(victim)
                ok = await self.llm.add_lora(
                    self.api.LoRARequest(lora_name=a.name, lora_int_id=a.int_id, lora_path=a.path)
                )
                if ok is False:
                    raise RuntimeError(f"vLLM refused adapter {name!r}")
                self._lru[name] = None
            new_tier = "cpu" if tier == "cpu" and a.tier != "gpu" else "gpu"
            if new_tier != a.tier:
                a.tier = new_tier
                self._emit(AdapterLoaded(self._info.replica_id, name, "gpu" if new_tier == "gpu" else "cpu"))
            self._lru.move_to_end(name)
            return a.tier

    async def _remove(self, a: _Adapter) -> None:
        await self.llm.remove_lora(a.int_id)
        self._lru.pop(a.name, None)
        old, a.tier = a.tier, "disk"
        if old != "disk":
            self._emit(AdapterUnloaded(self._info.replica_id, a.name, "gpu" if old == "gpu" else "cpu"))

    async def unload_adapter(self, name: str, tier: str = "") -> str:
        async with self._lock:
            a = self._adapters.get(name)
            if a is None:
                raise AdapterNotFoundError(name)
            if tier == "gpu" and a.tier == "gpu":
                # No demotion call in vLLM: the weights stay in its CPU LRU, GPU slots free up by LRU.
                a.tier = "cpu"
                self._emit(AdapterUnloaded(self._info.replica_id, name, "gpu"))
                return "cpu"
            if a.tier != "disk":
                await self._remove(a)
            if tier == "":
                del self._adapters[name]
                return ""
            return a.tier

    def adapters(self) -> list[tuple[str, str, str]]:
        return [(a.name, a.tier, a.source) for a in self._adapters.values()]

    # -- state --
    def resident_blocks(self) -> Iterable[int]:
        return self._kv.resident()

    def load_sample(self) -> LoadSample:
        running, waiting = len(self._running), len(self._waiting)
        kv = 0.0
        with contextlib.suppress(Exception):
            from prometheus_client import REGISTRY

            for fam in REGISTRY.collect():
                for s in fam.samples:
                    if s.name == "vllm:num_requests_running":
                        running = int(s.value)
                    elif s.name == "vllm:num_requests_waiting":
                        waiting = int(s.value)
                    elif s.name == "vllm:kv_cache_usage_perc":
                        kv = float(s.value)
        return LoadSample(self._info.replica_id, time.time(), running, waiting, 0, 0, kv)

    async def check_health(self) -> None:
        await self.llm.check_health()

    async def _kv_loop(self) -> None:
        """Subscribe to vLLM's ZMQ KV-event publisher and re-emit translated events."""
        import msgspec
        import zmq
        import zmq.asyncio

        assert self._kv_endpoint is not None
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.connect(self._kv_endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        dec = msgspec.msgpack.Decoder()
        try:
            while True:
                _topic, _seq, payload = await sub.recv_multipart()
                _ts, events, *_ = dec.decode(payload)
                for ev in events:
                    out = self._kv.translate(ev)
                    if out is not None:
                        self._emit(out)
        except asyncio.CancelledError:
            pass
        finally:
            sub.close(linger=0)

    async def close(self) -> None:
        if self._kv_task is not None:
            self._kv_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._kv_task
        self.llm.shutdown()
