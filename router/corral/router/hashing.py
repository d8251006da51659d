"""Prompt -> chained block hashes (the one hashing scheme shared by router, sim engine and benchmark).

A prompt's token ids are cut into fixed-size blocks (only full blocks are hashed, as in vLLM). Block i's
hash is ``xxh3_64(block_i_token_bytes, seed=hash_{i-1})`` and the root seed is derived from the *salt*
(adapter id, and tenant where caches are isolated), so a prefix cached under adapter A never matches the
same tokens under adapter B or the base model. Chaining makes a hash stand for the block *and everything
before it*, so prefix matching is "longest leading run of hashes present".

Traces that already publish chained block ids (Mooncake ``hash_ids``) are mapped into the same space with
:func:`salted_ids`, so the rest of the system never cares where hashes came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

DEFAULT_BLOCK_SIZE = 16
_MASK64 = (1 << 64) - 1
_xxh = xxhash.xxh3_64_intdigest


def root_seed(salt: str | None) -> int:
    """The chain's starting seed for a salt (``None`` = base model, no tenant isolation)."""
    return _xxh(b"corral-root\x00" + (salt or "").encode())


def salt_for(adapter: str | None, tenant: str | None = None) -> str | None:
    """Salt string for an adapter and an (optionally isolated) tenant; ``None`` when neither applies."""
    if adapter is None and tenant is None:
        return None
    return f"a={adapter or ''}\x00t={tenant or ''}"


def block_hashes(
    tokens: Sequence[int] | np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
    salt: str | None = None,
) -> list[int]:
    """Chained 64-bit hashes of every *full* block of ``tokens``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0 (got {block_size})")
    arr = np.asarray(tokens, dtype=np.uint32)
    n_blocks = len(arr) // block_size
    if n_blocks == 0:
        return []
    buf = memoryview(arr[: n_blocks * block_size].tobytes())
    step = block_size * 4
    h = root_seed(salt)
    out = [0] * n_blocks
    for i in range(n_blocks):
        h = _xxh(buf[i * step : (i + 1) * step], h)
        out[i] = h
    return out


def salted_ids(ids: Sequence[int], salt: str | None = None) -> list[int]:
    """Map externally chained block ids (e.g. Mooncake ``hash_ids``) into this hash space under a salt."""
    if salt is None:
        return [int(i) & _MASK64 for i in ids]
    seed = root_seed(salt)
    return [_xxh(int(i).to_bytes(8, "little", signed=False), seed) for i in ids]
