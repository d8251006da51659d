"""Building a ``RoutingRequest``: prompt (token ids or text) -> chained block hashes, hashed once.

Text goes through a pluggable :class:`Tokenizer`; the default :class:`ByteTokenizer` is a fast
deterministic stand-in (UTF-8 bytes grouped ``bytes_per_token`` at a time into one id), good enough for
prefix routing because equal text prefixes give equal token prefixes. Swap in a real tokenizer (anything
with ``encode(text) -> Sequence[int]``, e.g. a Hugging Face tokenizer wrapped) where block boundaries
must line up with the engine's own hashing. The salt is ``hashing.salt_for(adapter, tenant)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from .hashing import DEFAULT_BLOCK_SIZE, block_hashes, salt_for, salted_ids
from .types import RoutingRequest


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int] | np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes, ``bytes_per_token`` per id (little-endian; the tail is zero-padded). ~4 bytes/token
    is close to real BPE tokenizers on English text, so token counts are realistic."""

    def __init__(self, bytes_per_token: int = 4) -> None:
        if bytes_per_token not in (1, 2, 4):
            raise ValueError(f"bytes_per_token must be 1, 2 or 4 (got {bytes_per_token})")
        self.bytes_per_token = bytes_per_token
        self._dtype: np.dtype = np.dtype({1: "u1", 2: "<u2", 4: "<u4"}[bytes_per_token])

    def encode(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8")
        pad = (-len(raw)) % self.bytes_per_token
        if pad:
            raw += b"\x00" * pad
        return np.frombuffer(raw, dtype=self._dtype).astype(np.uint32)


DEFAULT_TOKENIZER = ByteTokenizer()


def build_request(
    request_id: str,
    model: str,
    *,
    tokens: Sequence[int] | np.ndarray | None = None,
    text: str | None = None,
    adapter: str | None = None,
    tenant: str | None = None,
    isolate_tenant: bool = True,
    slo_class: str | None = None,
    max_tokens: int = 256,
    block_size: int = DEFAULT_BLOCK_SIZE,
    tokenizer: Tokenizer | None = None,
    arrival: float = 0.0,
    adapter_size_mb: float | None = None,
) -> RoutingRequest:
    """Hash a prompt (exactly one of ``tokens`` / ``text``) into a ``RoutingRequest``.

    The chain is salted by the adapter and, when ``isolate_tenant``, by the tenant, so cached prefixes
    never cross adapters (or isolated tenants).
    """
    if (tokens is None) == (text is None):
        raise ValueError("give exactly one of tokens= or text=")
    if tokens is None:
        assert text is not None
        tokens = (tokenizer or DEFAULT_TOKENIZER).encode(text)
    salt = salt_for(adapter, tenant if isolate_tenant else None)
    return RoutingRequest(
        request_id=request_id,
        model=model,
        block_hashes=block_hashes(tokens, block_size, salt),
        prompt_tokens=len(tokens),
        max_tokens=max_tokens,
        adapter=adapter,
        tenant=tenant,
        slo_class=slo_class,
        arrival=arrival,
        adapter_size_mb=adapter_size_mb,
    )


def request_from_block_ids(
    request_id: str,
    model: str,
    block_ids: Sequence[int],
    prompt_tokens: int,
    *,
    adapter: str | None = None,
    tenant: str | None = None,
    isolate_tenant: bool = True,
    max_tokens: int = 256,
    arrival: float = 0.0,
    slo_class: str | None = None,
) -> RoutingRequest:
    """A request from a trace's already-chained block ids (Mooncake ``hash_ids``), salted the same way."""
    salt = salt_for(adapter, tenant if isolate_tenant else None)
    return RoutingRequest(
        request_id=request_id,
        model=model,
        block_hashes=salted_ids(block_ids, salt),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        adapter=adapter,
        tenant=tenant,
        slo_class=slo_class,
        arrival=arrival,
    )
