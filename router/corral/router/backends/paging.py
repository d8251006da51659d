"""Adapter paging on OpenAI-compatible backends: the RoutingPolicy's ``adapterPaging`` (pins, replication by
demand, unloading cold adapters) run by the same :class:`~corral.router.paging.AdapterPager` as on Corral's
engines, executed through vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

vLLM has no CPU tier in that API (``load_lora_adapter`` registers an adapter; the engine moves it to a GPU
slot on first use), so a CPU-tier prefetch registers it too, and every registered adapter counts as
GPU-resident in the router's view (``/v1/models``). Note vLLM's unload only unregisters the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from ..events import AdapterUnloaded
from ..paging import AdapterInfo, AdapterPager, PagingConfig
from .openai_http import error_message
from .pool import BackendPool


class HttpAdapterControl:
    """:class:`~corral.router.paging.AdapterControl` over the backends' LoRA endpoints."""

    def __init__(self, pool: BackendPool, timeout_s: float = 60.0) -> None:
        self.pool = pool
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _backend(self, replica_id: str) -> Any:
        b = self.pool.conn_for(replica_id)
        if b is None:
            raise LookupError(f"no backend {replica_id}")
        return b

    async def load_adapter(self, replica_id: str, adapter: str, source: str, tier: str) -> None:
        await self._backend(replica_id).stub.ensure_adapter(adapter, source)

    async def unload_adapter(self, replica_id: str, adapter: str) -> None:
        b = self._backend(replica_id)
        body = {"lora_name": adapter}
        async with self.pool.session().post(
            f"{b.url}/v1/unload_lora_adapter", json=body, timeout=self.timeout
        ) as r:
            text = await r.read()
            if r.status >= 400 and r.status != 404:  # 404: not loaded (any more): the goal is reached
                raise RuntimeError(
                    f"{b.url} unload {adapter}: HTTP {r.status}: {error_message(text, r.status)}"
                )
        b.adapters.pop(adapter, None)
        ev = AdapterUnloaded(replica_id, adapter, "gpu")
        self.pool.fleet.apply(ev)
        if self.pool.on_event is not None:
            self.pool.on_event(replica_id, ev)


class BackendPaging:
    """One router's pager over its backends: ``on_dispatch`` feeds demand, ``start``/``stop`` run it."""

    def __init__(self, pool: BackendPool, settings: Any) -> None:
        infos = [AdapterInfo(a.name, a.base_model, a.source) for a in settings.adapters.values()]
        self.pager = AdapterPager(pool.fleet, HttpAdapterControl(pool), [])
        self.pager.update(infos, PagingConfig.from_specs(settings.paging, settings.paging))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_dispatch(self, replica_id: str, req: Any) -> None:
        self.pager.on_dispatch(req.adapter)

    def start(self) -> None:
        self._task = asyncio.create_task(self.pager.run(self._stop), name="corral-backend-paging")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
