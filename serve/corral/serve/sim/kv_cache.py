"""Paged KV cache with prefix caching, modelled on vLLM v1's ``BlockPool`` / ``KVCacheManager``.

- The cache has ``num_blocks`` physical blocks of ``block_size`` tokens. A block has a reference count
  (the running requests that use it) and, once its tokens are computed and it is *full*, the chained
  block hash of its content (the same hash space as :mod:`corral.router.hashing`).
- Free blocks (ref 0) sit in one LRU *free queue*, whether they still hold a cached prefix or not.
  Allocation pops from the head (least recently freed); popping a block that holds a hash evicts that
  prefix from the cache (``BlockRemoved``). A request's blocks are freed *tail first*, so a chain's tail
  is evicted before its head (vLLM frees in reverse order for the same reason).
- A prefix hit (the longest leading run of a request's hashes present in the cache) re-references those
  blocks (``touch``): a free one leaves the free queue, so it can no longer be evicted.
- A full, computed block is registered under its hash (``BlockStored``) unless another block already
  holds the same hash (two requests computed the same prefix concurrently: vLLM keeps the duplicate
  uncached).

Usage (``kv_cache_usage_perc``) is ``1 - free / total``, as in vLLM: cached-but-free blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice, takewhile


class BlockPool:
    """Physical KV blocks, their reference counts, the hash -> block map and the LRU free queue."""

    __slots__ = ("_free", "_hash_of", "_ref", "block_size", "cached", "num_blocks", "removed", "stored")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0 (got {num_blocks}, {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> hash, for cached blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Hashes stored / evicted since the owner last drained them (turned into events once per step).
        self.stored: list[int] = []
        self.removed: list[int] = []

    # ---- queries ------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def match_len(self, hashes: Sequence[int], max_blocks: int) -> int:
        """Length of the longest leading run of ``hashes[:max_blocks]`` held in the cache."""
        return len(list(takewhile(self.cached.__contains__, islice(hashes, max_blocks))))

    def match(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest leading run of ``hashes[:max_blocks]`` held in the cache."""
        cached = self.cached
        n = len(list(takewhile(cached.__contains__, islice(hashes, max_blocks))))
        return [cached[h] for h in hashes[:n]] if n else []

    def num_evictable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` (a prefix hit) currently sit in the free queue."""
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    # ---- mutations ----------------------------------------------------------------------------------
    def touch(self, blocks: Sequence[int]) -> None:
        """Reference hit blocks (a free one leaves the free queue)."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the head of the free queue (the caller checked ``num_free``)."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self._free)} free")
        free, ref, hash_of, cached, removed = self._free, self._ref, self._hash_of, self.cached, self.removed
        out = []
        for _ in range(n):
            b = free.popitem(last=False)[0]
            h = hash_of.pop(b, None)
            if h is not None:
                del cached[h]
                removed.append(h)
            ref[b] = 1
            out.append(b)
        return out

    def free_blocks(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue, tail first."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                free[b] = None

    def cache_block(self, block: int, h: int) -> bool:
        """Register a full, computed block under its hash; False if that hash is already cached."""
        if h in self.cached or block in self._hash_of:
            return False
        self.cached[h] = block
        self._hash_of[block] = h
        self.stored.append(h)
        return True

    def clear(self) -> None:
        """Forget every cached prefix of free blocks (vLLM ``reset_prefix_cache``; used blocks stay)."""
        for b in list(self._free):
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self.cached[h]

    def drain(self) -> tuple[list[int], list[int]]:
        """The hashes stored and removed since the last drain."""
        s, r = self.stored, self.removed
        self.stored, self.removed = [], []
        return s, r
