"""Wall-clock driver: runs a :class:`~.engine.SimEngine` on the asyncio loop with real sleeps.

The engine core is the same as in virtual time; only the driver differs. One background task plans a
step, sleeps until its end (``step.duration / time_scale`` wall seconds; ``time_scale > 1`` runs faster
than real time), applies it and streams each request's new tokens to its consumer::

    eng = RealtimeSimEngine(SimEngine("H100", "r0", on_event=print), time_scale=1.0)
    async for tok in eng.generate(RequestSpec("q1", prompt_tokens=2048, max_tokens=64, block_hashes=h)):
        ...
    await eng.close()

Token ids are synthetic (the sim has no model). The engine clock (``SimEngine.now``, used in events and
records) is model time since the driver started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import SimEngine

_ABORTED = object()


@dataclass(slots=True)
class RequestSpec:
    """A request for :meth:`RealtimeSimEngine.generate` (the prompt is already hashed into blocks)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: Sequence[int] = field(default_factory=list)
    adapter: str | None = None
    adapter_mb: float | None = None
    output_block_hashes: Sequence[int] | None = None


class RealtimeSimEngine:
    """A :class:`SimEngine` stepped in wall-clock time; ``generate`` streams token ids per step."""

    def __init__(self, engine: SimEngine, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 (got {time_scale})")
        self.engine = engine
        self.time_scale = time_scale
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._load_waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._base = 0.0

    # ---- clock ------------------------------------------------------------------------------------
    def clock(self) -> float:
        """Engine-clock now (model seconds)."""
        if self._task is None:
            return self.engine.now
        return self._base + (asyncio.get_running_loop().time() - self._t0) * self.time_scale

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._t0 = loop.time()
            self._base = self.engine.now
            self._task = loop.create_task(self._run(), name=f"sim-engine-{self.engine.replica_id}")

    async def close(self) -> None:
        """Stop the stepping task (requests in flight stop receiving tokens)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- API --------------------------------------------------------------------------------------
    async def generate(self, req: RequestSpec) -> AsyncIterator[int]:
        """Stream the request's token ids as the engine produces them (first after its prefill)."""
        self._ensure_started()
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.engine.add_request(
            req.request_id,
            req.prompt_tokens,
            req.max_tokens,
            req.block_hashes,
            adapter=req.adapter,
            adapter_mb=req.adapter_mb,
            output_block_hashes=req.output_block_hashes,
            now=self.clock(),
        )
        self._queues[req.request_id] = q
        assert self._wake is not None
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await q.get()
                if item is _ABORTED:
                    return
                toks, finished = item
                for t in toks:
                    yield t
        finally:
            self._queues.pop(req.request_id, None)
            if not finished:
                self.engine.abort(req.request_id, now=self.clock())

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id, now=self.clock())
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(_ABORTED)

    async def load_adapter(self, name: str, tier: str = "gpu", size_mb: float | None = None) -> str:
        """Load an adapter (its time is spent in the engine's next step); returns its resulting tier."""
        self._ensure_started()
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._load_waiters.setdefault(name, []).append(fut)
        self.engine.load_adapter(name, tier, size_mb)
        assert self._wake is not None
        self._wake.set()
        return await fut

    def unload_adapter(self, name: str, tier: str = "") -> str:
        return self.engine.unload_adapter(name, tier)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    # ---- the stepping loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        eng = self.engine
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            step = eng.schedule_step(self.clock()) if eng.has_work() else None
            if step is None:
                await wake.wait()
                continue
            delay = self._t0 + (step.end - self._base) / self.time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for seq, gen, _first, finished in eng.finish_step(step):
                q = self._queues.get(seq.request_id)
                if q is not None:
                    base = seq.num_output - gen
                    q.put_nowait(([1000 + (base + k) % 30000 for k in range(gen)], finished))
            for name in step.loaded:
                for fut in self._load_waiters.pop(name, []):
                    if not fut.done():
                        fut.set_result(eng.adapter_tier(name))
