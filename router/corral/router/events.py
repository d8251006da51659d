"""Engine -> router events: the one contract by which engine replicas (sim or vLLM, in-process or over
gRPC) tell routers what they hold. Routers rebuild all replica state from these; nothing is global.

Mirrors vLLM's KV events (BlockStored / BlockRemoved / AllBlocksCleared) plus adapter residency and
periodic load samples (the ``vllm:num_requests_running`` / ``waiting`` / ``kv_cache_usage_perc`` gauges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AdapterTier = Literal["gpu", "cpu"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    replica_id: str
    block_hashes: tuple[int, ...]
    medium: str = "gpu"
    """Where the blocks are held: ``"gpu"`` (the prefix cache) or ``"cpu"`` (the host KV tier of a CPU
    offloading connector; vLLM's KV events carry the same field)."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    replica_id: str
    block_hashes: tuple[int, ...]
    medium: str = "gpu"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    replica_id: str


@dataclass(frozen=True, slots=True)
class AdapterLoaded:
    replica_id: str
    adapter: str
    tier: AdapterTier


@dataclass(frozen=True, slots=True)
class AdapterUnloaded:
    replica_id: str
    adapter: str
    tier: AdapterTier


@dataclass(frozen=True, slots=True)
class LoadSample:
    """A replica's own view of its load at ``time`` (seconds on the *engine's* clock).

    ``time`` orders one engine's samples; it is never compared with a router's clock (another process,
    perhaps another machine, with another epoch). Routers judge freshness by when a sample arrived:
    ``FleetState.apply`` stamps it on receipt (``ReplicaState.sample_received_at``).
    """

    replica_id: str
    time: float
    running: int
    waiting: int
    waiting_prefill_tokens: int
    running_tokens: int
    kv_usage: float


EngineEvent = BlockStored | BlockRemoved | AllBlocksCleared | AdapterLoaded | AdapterUnloaded | LoadSample
