"""The ceiling of the fleet benchmark: what any router could at best do on a workload with a fleet.

- **Pooled-cache hit rate** (:func:`pooled_hit_rate`): the fleet's KV caches pooled into one LRU cache of
  their total capacity (GPU, plus the CPU KV tier when the fleet has one), fed the workload in arrival
  order; a request hits its longest cached leading run of blocks (at least one token is recomputed, as
  in vLLM), then all its blocks become most recent. No router can give each request a longer cached
  prefix than one cache holding every replica's blocks, short of an eviction policy that sees the future.
- **Fluid goodput** (:func:`fluid_goodput`): the request rate the fleet sustains with that hit rate and
  perfect balance, no queueing: replica class ``g`` spends ``uncached x b1 + output x (b0 / B + b2)``
  microseconds per request (its prefill, then its decode tokens sharing each step's fixed cost ``b0`` with
  a batch of ``B`` = the running requests its KV cache holds when cached prefixes are shared, i.e. KV
  capacity / (uncached + output tokens), capped at ``max_num_seqs``), and the fleet's
  rate is the sum of ``1 / cost`` over replicas. Adapter loads cost nothing (perfect placement).

- **Goodput ceiling** (:func:`finite_run_goodput`): the benchmark's goodput is the highest arrival rate
  of a finite run whose P90 TTFT meets the SLO, so a run may exceed the fluid rate ``C`` for a while: in
  a fluid queue fed at ``lambda > C`` from empty, the request arriving at time ``t`` waits
  ``(lambda / C - 1) t``; the P90 request (the share ``f = w + 0.9 (1 - w)`` of the run, ``w`` the warmup
  share) arrives at ``f N / lambda``, so the P90 TTFT meets the SLO ``S`` while
  ``lambda <= f N C / (f N - S C)``. That rate is the ceiling reported (it tends to ``C`` for long runs).

It is an estimate of the ceiling, not a proof: with an SLO on TTFT no real fleet runs at 100% busy, so
the measured goodput of every policy sits below it; the distance from it is what the tables show.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from corral.api.profiles import GpuProfile
from corral.serve.sim.workloads import Workload


def pooled_hit_rate(w: Workload, capacity_blocks: int, warmup: float = 0.0) -> tuple[float, float]:
    """(token hit rate over the requests after the ``warmup`` share, mean uncached prompt tokens) of one
    LRU cache of ``capacity_blocks`` blocks shared by the whole fleet."""
    bs = w.block_size
    lru: OrderedDict[int, None] = OrderedDict()
    reqs = w.requests
    n_warm = int(len(reqs) * warmup)
    hit = total = 0
    for k, r in enumerate(reqs):
        m = 0
        for h in r.block_hashes:
            if h not in lru:
                break
            m += 1
        if k >= n_warm:
            hit += min(m * bs, r.prompt_tokens - 1)
            total += r.prompt_tokens
        for h in (*r.block_hashes, *(r.output_block_hashes or ())):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    measured = max(1, len(reqs) - n_warm)
    rate = hit / max(1, total)
    return rate, (total - hit) / measured


def fluid_goodput(w: Workload, replicas: Sequence[GpuProfile], uncached_mean: float) -> float:
    """Requests per second the fleet serves with ``uncached_mean`` prefill tokens per request and perfect
    balance (see the module docstring)."""
    reqs = w.requests
    n = max(1, len(reqs))
    out = sum(r.max_tokens for r in reqs) / n
    rate = 0.0
    for prof in replicas:
        batch = max(1.0, min(prof.max_num_seqs, prof.kv_capacity_tokens / max(1.0, uncached_mean + out)))
        per_req_us = uncached_mean * prof.b1_us + out * (prof.b0_us / batch + prof.b2_us)
        rate += 1e6 / per_req_us
    return rate


def upper_bound(
    w: Workload, replicas: Sequence[GpuProfile], warmup: float, cpu_kv_tokens: int = 0
) -> dict[str, float]:
    """The ceiling of one workload on one fleet: pooled-cache hit rate, fluid rate and goodput ceiling."""
    tokens = sum(p.kv_capacity_tokens for p in replicas) + cpu_kv_tokens * len(replicas)
    hit, uncached = pooled_hit_rate(w, tokens // w.block_size, warmup)
    fluid = fluid_goodput(w, replicas, uncached)
    return {
        "prefix_hit_rate": hit,
        "fluid_rps": fluid,
        "goodput_rps": finite_run_goodput(fluid, len(w.requests), warmup, w.slo_ttft_s),
    }


def finite_run_goodput(fluid_rps: float, requests: int, warmup: float, slo_s: float) -> float:
    """The highest rate of a ``requests``-long run, started empty, whose P90 TTFT in a fluid queue of rate
    ``fluid_rps`` stays within ``slo_s`` (see the module docstring; inf if the whole run fits)."""
    f_n = (warmup + 0.9 * (1.0 - warmup)) * requests
    room = f_n - slo_s * fluid_rps
    return f_n * fluid_rps / room if room > 0 else float("inf")
