"""The sim engine behind the :class:`~corral.serve.endpoint.engine.Engine` protocol.

:class:`SimEndpointEngine` wraps a :class:`corral.serve.sim.RealtimeSimEngine` (wall-clock driver, any
``time_scale``): it streams the sim's synthetic tokens, forwards its KV/adapter events to the endpoint
(the endpoint sends its own wall-clock load samples, so the sim's engine-clock samples are dropped), and
keeps an adapter catalog (name -> source URI) so that an adapter nobody registered is refused with
NOT_FOUND, like vLLM, while a request that carries ``adapter_source`` registers it on first use. With
``adapter_cache_dir`` set, a ``file://`` source is fetched and validated on first use like the vLLM engine
does (:func:`corral.serve.adapter_sources.fetch_adapter`): a missing or corrupt file raises
:class:`~corral.serve.adapter_sources.AdapterSourceError` naming the adapter, and it is not registered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from corral.api.profiles import GpuProfile
from corral.router.events import EngineEvent, LoadSample
from corral.router.hashing import block_hashes, salt_for
from corral.serve.adapter_sources import AdapterSourceError, fetch_adapter, parse_source
from corral.serve.sim import RealtimeSimEngine, RequestSpec, SimEngine

from .engine import AdapterNotFoundError, EngineEventSource, EngineInfo, EngineRequest, TokenChunk


def _text(tok: int) -> str:
    return chr(97 + tok % 26)


class SimEndpointEngine(EngineEventSource):
    """A wall-clock sim replica served by :class:`~corral.serve.endpoint.EngineEndpoint`."""

    def __init__(
        self,
        rt: RealtimeSimEngine,
        model: str,
        gpu_class: str | None = None,
        max_model_len: int = 32768,
        adapters: dict[str, str] | None = None,
        adapter_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.rt = rt
        self.adapter_cache_dir = adapter_cache_dir
        sim = rt.engine
        self.sim = sim
        sim.on_event = self._on_sim_event
        self.catalog: dict[str, str] = dict(adapters or {})
        self._info = EngineInfo(
            replica_id=sim.replica_id,
            model=model,
            gpu_class=gpu_class or sim.profile.name,
            profile=sim.profile.name,
            block_size=sim.block_size,
            kv_capacity_blocks=sim.pool.num_blocks,
            max_loras=sim.max_loras,
            max_cpu_loras=sim.max_cpu_loras,
            max_model_len=max_model_len,
            engine="sim",
        )

    @classmethod
    def create(
        cls,
        profile: GpuProfile | str,
        replica_id: str,
        model: str,
        *,
        time_scale: float = 1.0,
        block_size: int = 16,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        gpu_class: str | None = None,
        max_model_len: int = 32768,
        adapter_cache_dir: str | Path | None = None,
        **sim_kw: Any,
    ) -> SimEndpointEngine:
        sim = SimEngine(profile, replica_id, block_size, max_loras, max_cpu_loras, **sim_kw)
        rt = RealtimeSimEngine(sim, time_scale)
        return cls(rt, model, gpu_class, max_model_len, adapter_cache_dir=adapter_cache_dir)

    async def _check_source(self, name: str, uri: str) -> None:
        """With ``adapter_cache_dir``: fetch and validate a ``file://`` source (as the vLLM engine does)."""
        if self.adapter_cache_dir is None or not uri or parse_source(uri).scheme != "file":
            return
        try:
            await asyncio.to_thread(fetch_adapter, name, uri, self.adapter_cache_dir)
        except AdapterSourceError as e:
            msg = str(e)
            raise AdapterSourceError(msg if repr(name) in msg else f"adapter {name!r}: {msg}") from None

    def _on_sim_event(self, ev: EngineEvent) -> None:
        if not isinstance(ev, LoadSample):
            self._emit(ev)

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        adapter = req.adapter
        if adapter is not None and adapter not in self.catalog:
            if not req.adapter_source:
                raise AdapterNotFoundError(adapter)
            await self._check_source(adapter, req.adapter_source)
            self.catalog[adapter] = req.adapter_source
        n_prompt = len(req.prompt_token_ids)
        if n_prompt < 1:
            raise ValueError("prompt must have at least one token")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {req.max_tokens})")
        hashes = req.block_hashes or block_hashes(
            req.prompt_token_ids, self._info.block_size, salt_for(adapter, req.tenant)
        )
        spec = RequestSpec(req.request_id, n_prompt, req.max_tokens, hashes, adapter=adapter)
        n = 0
        cached = 0
        async for tok in self.rt.generate(spec):
            if n == 0:
                seq = self.sim.seqs.get(req.request_id)
                if seq is not None:
                    cached = max(0, n_prompt - seq.expected_uncached)
            n += 1
            if n >= req.max_tokens:
                yield TokenChunk([tok], _text(tok), "length", n_prompt, n, cached)
                return
            yield TokenChunk([tok], _text(tok))
        yield TokenChunk([], "", "abort" if n < req.max_tokens else "length", n_prompt, n, cached)

    def abort(self, request_id: str) -> None:
        self.rt.abort(request_id)

    def has_adapter(self, name: str) -> bool:
        return name in self.catalog

    async def load_adapter(self, name: str, source_uri: str, tier: str = "gpu") -> str:
        if source_uri and source_uri != self.catalog.get(name):
            await self._check_source(name, source_uri)
        if source_uri or name not in self.catalog:
            self.catalog[name] = source_uri
        return await self.rt.load_adapter(name, tier or "gpu")

    async def unload_adapter(self, name: str, tier: str = "") -> str:
        out = self.rt.unload_adapter(name, tier)
        if not tier:
            self.catalog.pop(name, None)
        return out

    def adapters(self) -> list[tuple[str, str, str]]:
        return [(n, self.sim.adapter_tier(n), s) for n, s in self.catalog.items()]

    def resident_blocks(self) -> Iterable[int]:
        return self.sim.resident_blocks()

    def load_sample(self) -> LoadSample:
        return self.sim.load_sample(self.rt.clock())

    async def close(self) -> None:
        await self.rt.close()
