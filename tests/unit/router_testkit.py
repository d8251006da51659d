"""Shared builders for the router unit tests (fleets of replicas on built-in GPU profiles, prompts)."""

from __future__ import annotations

import numpy as np
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.request import build_request
from corral.router.state import FleetState
from corral.router.types import RoutingRequest


def fleet(
    n: int,
    *,
    model: str = "m",
    gpu: str = "H100",
    mode: str = "approximate",
    block_size: int = 16,
    kv_blocks: int | None = None,
) -> FleetState:
    f = FleetState(mode)  # type: ignore[arg-type]
    for i in range(n):
        f.add_replica(
            f"r{i:03d}",
            model,
            gpu,
            BUILTIN_PROFILES[gpu],
            block_size=block_size,
            kv_capacity_blocks=kv_blocks,
        )
    return f


def prompt(seed: int, n_tokens: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n_tokens, dtype=np.uint32)


def req(
    rid: str,
    tokens: np.ndarray,
    *,
    model: str = "m",
    adapter: str | None = None,
    block_size: int = 16,
    slo_class: str | None = None,
) -> RoutingRequest:
    return build_request(
        rid, model, tokens=tokens, adapter=adapter, block_size=block_size, slo_class=slo_class
    )
