"""CPU KV tier of a simulated replica, modelled on vLLM's CPU offloading connector and LMCache.

- **Write-through**: every KV block the engine computes and registers in its GPU prefix cache is also
  stored to host memory (the connector copies it out asynchronously, off the critical path: no cost is
  charged for the store). The host tier is one LRU of ``capacity_blocks`` blocks keyed by the same chained
  block hash; storing a hash already held refreshes it, storing past capacity evicts the least recent.
- **Load on hit**: when a request is admitted, the blocks that follow its GPU prefix hit and are held in
  host memory (the longest such run) are copied back to the GPU instead of being recomputed. The copy
  runs in the step that admits the request and costs ``GpuProfile.kv_load_s`` (KV bytes per token over
  that GPU class's host-to-device PCIe bandwidth); the request's loaded blocks join the GPU prefix cache.
- **Events**: blocks stored into and evicted from the tier are reported like the GPU's, with
  ``medium="cpu"`` (vLLM's KV events carry the same ``medium`` field), once per step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice


class CpuKvTier:
    """Host-memory KV blocks by hash (LRU), and the hashes stored / evicted since the last drain."""

    __slots__ = ("_announced", "_lru", "capacity_blocks", "removed", "stored")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be > 0 (got {capacity_blocks})")
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.stored: list[int] = []
        self.removed: list[int] = []
        self._announced: set[int] = set()  # reported as stored by drain and not yet as removed

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, h: int) -> bool:
        return h in self._lru

    def store(self, hashes: Iterable[int]) -> None:
        """Write blocks through to host memory (most recent last), evicting the least recent."""
        lru = self._lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            self.stored.append(h)
            if len(lru) > self.capacity_blocks:
                old = lru.popitem(last=False)[0]
                self.removed.append(old)

    def match_from(self, hashes: Sequence[int], start: int, max_blocks: int) -> int:
        """How many of ``hashes[start:max_blocks]``, from ``start`` on, are held (a leading run)."""
        lru = self._lru
        n = 0
        for h in islice(hashes, start, max_blocks):
            if h not in lru:
                break
            n += 1
        return n

    def touch(self, hashes: Iterable[int]) -> None:
        lru = self._lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)

    def drain(self) -> tuple[list[int], list[int]]:
        """(stored, evicted) since the last drain, net of what earlier drains reported: a block stored and
        evicted in between is in neither list, one reported, evicted and stored again in neither."""
        lru, told = self._lru, self._announced
        s = [h for h in dict.fromkeys(self.stored) if h in lru and h not in told]
        r = [h for h in dict.fromkeys(self.removed) if h not in lru and h in told]
        told.update(s)
        told.difference_update(r)
        self.stored, self.removed = [], []
        return s, r
