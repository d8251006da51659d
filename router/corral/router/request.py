"""Building a ``RoutingRequest``: prompt (token ids or text) -> chained block hashes, hashed once.

Text goes through a :class:`~corral.router.tokenizer.Tokenizer` (:mod:`corral.router.tokenizer`, the one
interface of router, engines and benchmarks); the default is the simulator's
:data:`~corral.router.tokenizer.SIM_TOKENIZER`. Pass the model's real tokenizer where block boundaries must
line up with the engine's own hashing. The salt is ``hashing.salt_for(adapter, tenant)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .hashing import DEFAULT_BLOCK_SIZE, block_hashes, salt_for, salted_ids
from .tokenizer import SIM_TOKENIZER, ByteTokenizer, Tokenizer
from .types import RoutingRequest

__all__ = ["ByteTokenizer", "Tokenizer", "build_request", "request_from_block_ids"]


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
        tokens = (tokenizer or SIM_TOKENIZER).encode(text)
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
