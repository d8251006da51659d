"""Shared helpers of the sim engine tests: a minimal workload request and random block hashes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Req:
    request_id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    adapter: str | None = None
    adapter_mb: float | None = None
    output_block_hashes: list[int] | None = None


def hashes(tag: int, n: int) -> list[int]:
    rng = random.Random(tag)
    return [rng.getrandbits(64) for _ in range(n)]
