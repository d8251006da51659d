"""Value types of one routing decision: the request as the policy sees it, and the decision it returns.

Kept free of I/O and of any server framework so that the sim benchmark, the router service and
`corral explain` share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RoutingRequest:
    """What a policy needs to know about a request (the prompt is already hashed, once)."""

    request_id: str
    model: str
    block_hashes: list[int]
    prompt_tokens: int
    max_tokens: int = 256
    adapter: str | None = None
    tenant: str | None = None
    slo_class: str | None = None
    arrival: float = 0.0
    adapter_size_mb: float | None = None  # None: the policy's default adapter size


@dataclass(slots=True)
class CandidateCost:
    """One candidate's cost terms, in seconds (for traces and `corral explain`)."""

    replica_id: str
    gpu_class: str
    total_s: float
    queue_s: float = 0.0
    prefill_s: float = 0.0
    adapter_s: float = 0.0
    cached_blocks: int = 0
    adapter_tier: str = "gpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Decision:
    """The chosen replica, and why."""

    replica_id: str
    policy: str
    reason: str
    cached_blocks: int = 0
    candidates: list[CandidateCost] | None = None
