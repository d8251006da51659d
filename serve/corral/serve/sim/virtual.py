"""Virtual-time driver for one :class:`~.engine.SimEngine`: a discrete-event loop over arrivals and step
ends, no sleeping. Thousands of requests per CPU-second (pure-decode stretches run as macro steps).

The fleet benchmark has its own loop over many engines and a router (:mod:`.fleet`); this one is for a
single replica (fidelity tests, profiling).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from .engine import SimEngine
from .metrics import RequestRecord


class ArrivingRequest(Protocol):
    """What the drivers need from a workload request (see :class:`.workloads.Request`)."""

    request_id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    block_hashes: list[int]
    adapter: str | None
    adapter_mb: float | None
    output_block_hashes: list[int] | None


def submit(engine: SimEngine, r: ArrivingRequest, now: float) -> None:
    engine.add_request(
        r.request_id,
        r.prompt_tokens,
        r.max_tokens,
        r.block_hashes,
        adapter=r.adapter,
        adapter_mb=r.adapter_mb,
        output_block_hashes=r.output_block_hashes,
        now=now,
        user=r,
    )


def simulate(
    engine: SimEngine,
    requests: Iterable[ArrivingRequest],
    *,
    max_steps: int = 1024,
    until: float = math.inf,
) -> list[RequestRecord]:
    """Run ``requests`` (any order; sorted by arrival) through ``engine`` until all finish (or ``until``).

    Returns the engine's request records (finished and aborted) in completion order."""
    reqs = sorted(requests, key=lambda r: r.arrival)
    n = len(reqs)
    i = 0
    now = engine.now
    step = None
    while True:
        nxt = reqs[i].arrival if i < n else math.inf
        if step is None:
            if not engine.has_work():
                if i >= n or nxt > until:
                    break
                now = max(now, nxt)
                submit(engine, reqs[i], now)
                i += 1
                continue
            step = engine.schedule_step(now, max_steps)
            if step is None:
                if i >= n:
                    break
                now = max(now, nxt)
                submit(engine, reqs[i], now)
                i += 1
                continue
        if nxt < step.end:
            engine.truncate_step(step, nxt)
            if nxt < step.end:
                submit(engine, reqs[i], nxt)
                i += 1
                continue
        now = step.end
        if now > until:
            break
        engine.finish_step(step)
        step = None
    return engine.metrics.records
