"""The ``Engine`` protocol an engine replica implements to be served over gRPC, and a zero-cost engine.

An :class:`Engine` streams tokens for one request, aborts requests, loads/unloads LoRA adapters, and
reports what it holds (resident KV block hashes, adapters by tier, a load sample) plus a live stream of
:mod:`corral.router.events` through listeners. The sim engine's wall-clock driver (through
:mod:`corral.serve.endpoint.sim`) and the vLLM engine implement it; :class:`EchoEngine` is a trivial
engine that answers at once (benchmarks, tests).

Event listeners are called synchronously on the event loop thread that runs the engine, so a snapshot
taken between two awaits is consistent with the events that follow it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from corral.router.events import (
    AdapterLoaded,
    AdapterUnloaded,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    LoadSample,
)
from corral.router.wire import EngineInfo

__all__ = [
    "AdapterNotFoundError",
    "EchoEngine",
    "Engine",
    "EngineEventSource",
    "EngineInfo",
    "EngineRequest",
    "TokenChunk",
]

EventListener = Callable[[EngineEvent], None]


class AdapterNotFoundError(LookupError):
    """The engine does not know the adapter and has no source to load it from."""


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int = 16
    block_hashes: list[int] = field(default_factory=list)
    adapter: str | None = None
    adapter_source: str | None = None
    tenant: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenChunk:
    """New tokens of one request; the last chunk has ``finish_reason`` and usage set."""

    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """What :class:`corral.serve.endpoint.EngineEndpoint` needs from an engine replica."""

    @property
    def info(self) -> EngineInfo: ...

    def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        """Stream the request's tokens. Raise :class:`AdapterNotFoundError` for an unknown adapter and
        ``ValueError`` for an invalid request, before the first chunk."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a running request (client went away). Unknown ids are ignored."""

    def has_adapter(self, name: str) -> bool:
        """Whether the engine knows the adapter (in any tier, including known-but-on-disk)."""
        ...

    async def load_adapter(self, name: str, source_uri: str, tier: str = "gpu") -> str:
        """Register/load an adapter into ``tier``; returns the resulting tier."""
        ...

    async def unload_adapter(self, name: str, tier: str = "") -> str:
        """Demote (``tier="gpu"`` -> cpu) or forget (``""``) an adapter; returns the resulting tier."""
        ...

    def adapters(self) -> list[tuple[str, str, str]]:
        """Known adapters as (name, tier, source_uri), tier in ``gpu`` / ``cpu`` / ``disk``."""
        ...

    def resident_blocks(self) -> Iterable[int]:
        """Hashes of the KV blocks cached now."""
        ...

    def load_sample(self) -> LoadSample: ...

    def add_event_listener(self, cb: EventListener) -> None: ...

    def remove_event_listener(self, cb: EventListener) -> None: ...


class EngineEventSource:
    """Listener bookkeeping for engines (a mixin): ``self._emit(ev)`` calls every listener."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def add_event_listener(self, cb: EventListener) -> None:
        self._listeners.append(cb)

    def remove_event_listener(self, cb: EventListener) -> None:
        if cb in self._listeners:
            self._listeners.remove(cb)

    def _emit(self, ev: EngineEvent) -> None:
        for cb in self._listeners:
            cb(ev)


class EchoEngine(EngineEventSource):
    """A zero-cost engine: answers every request at once with ``max_tokens`` tokens (the prompt's tail).

    It keeps a bounded LRU of "cached" block hashes and emits ``BlockStored`` / ``BlockRemoved`` like a
    real engine, so routers see realistic prefix events; adapters are known once loaded.
    """

    def __init__(
        self,
        replica_id: str = "echo-0",
        model: str = "echo",
        gpu_class: str = "cpu",
        profile: str = "H100",
        block_size: int = 16,
        kv_capacity_blocks: int = 4096,
        max_loras: int = 4,
        max_model_len: int = 8192,
        emit_blocks: bool = True,
    ) -> None:
        super().__init__()
        self._info = EngineInfo(
            replica_id=replica_id,
            model=model,
            gpu_class=gpu_class,
            profile=profile,
            block_size=block_size,
            kv_capacity_blocks=kv_capacity_blocks,
            max_loras=max_loras,
            max_cpu_loras=max_loras * 2,
            max_model_len=max_model_len,
            engine="echo",
        )
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._adapters: dict[str, tuple[str, str]] = {}  # name -> (tier, source)
        self._emit_blocks = emit_blocks
        self.running = 0
        self.served = 0
        self.aborted: list[str] = []

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        if req.adapter and req.adapter not in self._adapters:
            if not req.adapter_source:
                raise AdapterNotFoundError(req.adapter)
            await self.load_adapter(req.adapter, req.adapter_source, "gpu")
        cached = self._store(req.block_hashes)
        n = max(0, req.max_tokens)
        toks = req.prompt_token_ids[-n:] if n else []
        toks = toks + [32] * (n - len(toks))
        self.served += 1
        yield TokenChunk(
            token_ids=toks,
            finish_reason="length",
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=n,
            cached_tokens=cached * self._info.block_size,
        )

    def _store(self, hashes: list[int]) -> int:
        blocks = self._blocks
        cached = 0
        for h in hashes:
            if h in blocks:
                cached += 1
                blocks.move_to_end(h)
            else:
                break
        new = [h for h in hashes[cached:] if h not in blocks]
        for h in new:
            blocks[h] = None
        evicted = []
        while len(blocks) > self._info.kv_capacity_blocks:
            evicted.append(blocks.popitem(last=False)[0])
        if self._emit_blocks and self._listeners:
            if new:
                self._emit(BlockStored(self._info.replica_id, tuple(new)))
            if evicted:
                self._emit(BlockRemoved(self._info.replica_id, tuple(evicted)))
        return cached

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    async def load_adapter(self, name: str, source_uri: str, tier: str = "gpu") -> str:
        tier = tier or "gpu"
        self._adapters[name] = (tier, source_uri)
        self._emit(AdapterLoaded(self._info.replica_id, name, "cpu" if tier == "cpu" else "gpu"))
        return tier

    async def unload_adapter(self, name: str, tier: str = "") -> str:
        cur = self._adapters.get(name)
        if cur is None:
            raise AdapterNotFoundError(name)
        if tier == "gpu" and cur[0] == "gpu":
            self._adapters[name] = ("cpu", cur[1])
            self._emit(AdapterUnloaded(self._info.replica_id, name, "gpu"))
            return "cpu"
        del self._adapters[name]
        self._emit(AdapterUnloaded(self._info.replica_id, name, "cpu" if cur[0] == "cpu" else "gpu"))
        return ""

    def adapters(self) -> list[tuple[str, str, str]]:
        return [(n, t, s) for n, (t, s) in self._adapters.items()]

    def resident_blocks(self) -> Iterable[int]:
        return list(self._blocks)

    def load_sample(self) -> LoadSample:
        cap = max(1, self._info.kv_capacity_blocks)
        return LoadSample(self._info.replica_id, time.time(), 0, 0, 0, 0, len(self._blocks) / cap)
