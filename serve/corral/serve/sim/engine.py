"""The simulated engine: one vLLM-like replica, stepped by a virtual-time or a wall-clock driver.

:class:`SimEngine` models what matters for routing on a vLLM v1 engine:

- **Scheduler** (vLLM v1 ``Scheduler.schedule`` semantics): each step has a token budget
  (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``). Running requests go first (a
  decode needs 1 token; a request still prefilling takes ``min(remaining, budget)``, i.e. chunked
  prefill); then waiting requests in FCFS order fill what is left of the budget. A waiting request is
  admitted only if its KV blocks can be allocated; if a running request cannot get a block, the *last*
  running request is preempted (recompute: blocks freed, back to the front of the queue) and no waiting
  request is admitted in that step. A batch holds at most ``max_loras`` distinct adapters; a request
  whose adapter cannot join the batch is skipped (it keeps its place) and later ones are considered.
- **KV cache** with prefix caching by chained block hash (:mod:`.kv_cache`): the request carries the
  hashes of its full prompt blocks (and optionally of the blocks its output will fill); cached leading
  blocks skip prefill (at least one token is always computed, as in vLLM).
- **CPU KV tier** (:mod:`.kv_offload`, optional): computed blocks are written through to host memory; a
  request's blocks past its GPU hit that the tier holds are copied back (PCIe time, in its step) instead
  of recomputed; tier changes go out as KV events with ``medium="cpu"``.
- **LoRA** (:mod:`.lora`): an adapter must be GPU-resident to be in a batch; making it resident is done in
  the step that first uses it and costs the profile's load time by tier (the whole batch waits, as in
  vLLM's worker).
- **Step time** ``b0 + b1 * prefill_tokens + b2 * decode_tokens`` microseconds from the GPU profile, plus
  adapter loads.
- **Events** (:mod:`corral.router.events`): ``BlockStored`` / ``BlockRemoved`` once per step,
  adapter residency changes, and a ``LoadSample`` every ``sample_interval_s`` (and when it goes idle),
  through ``on_event``.

Driving it: ``schedule_step(now)`` plans the next step and returns a :class:`Step` (its ``end`` is when
it completes), ``finish_step(step)`` applies it at ``step.end`` and returns the tokens produced. Nothing
else advances the engine, so the same code runs under the discrete-event loop (:mod:`.virtual`,
:mod:`.fleet`) and under asyncio with real sleeps (:mod:`.realtime`). In virtual time a driver may ask
for up to ``max_steps`` identical pure-decode steps at once (the batch cannot change before the next
finish or arrival); :meth:`SimEngine.truncate_step` cuts such a step short when a request arrives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.api.profiles import GpuProfile, adapter_mb, resolve_profile
from corral.router.events import BlockRemoved, BlockStored, EngineEvent, LoadSample

from .kv_cache import BlockPool
from .kv_offload import CpuKvTier
from .lora import AdapterSlots
from .metrics import EngineMetrics, RequestRecord

WAITING, RUNNING, FINISHED, ABORTED = 0, 1, 2, 3

EventCallback = Callable[[EngineEvent], None]
StepOutput = tuple["SimSeq", int, bool, bool]
"""(request, tokens generated in the step, whether they include the first token, finished)."""


@dataclass(slots=True, eq=False)
class SimSeq:
    """One request inside the engine: what it asked for and how far it got."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    hashes: list[int]  # full prompt blocks, then (optionally) the blocks its output will fill
    adapter: str | None = None
    adapter_mb: float | None = None
    arrival: float = 0.0
    user: Any = None  # the driver's own handle (e.g. the workload request)
    status: int = WAITING
    num_computed: int = 0
    num_output: int = 0
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading blocks registered in the prefix cache
    cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    expected_uncached: int = 0  # tokens to prefill, estimated on arrival (load samples)
    first_token: float | None = None
    finish: float | None = None
    preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output


@dataclass(slots=True, eq=False)
class Step:
    """A planned engine step (or ``n_steps`` identical pure-decode steps) starting at ``start``."""

    start: float
    step_s: float  # one step, without adapter loads
    load_s: float  # adapter loads charged before the forward pass
    n_steps: int
    scheduled: list[tuple[SimSeq, int]]  # (request, new tokens in one step)
    prefill_tokens: int
    decode_tokens: int
    loaded: list[str] = field(default_factory=list)  # adapters loaded by explicit load_adapter calls

    @property
    def duration(self) -> float:
        return self.load_s + self.step_s * self.n_steps

    @property
    def end(self) -> float:
        return self.start + self.load_s + self.step_s * self.n_steps


class SimEngine:
    """A simulated vLLM replica on one GPU class. See the module docstring for the model.

    Args:
        profile: GPU profile (or its name) giving step-time coefficients, KV capacity and budgets.
        replica_id: id used in events.
        block_size: tokens per KV block (the granularity of the request's block hashes).
        max_loras: adapters a batch may hold (GPU slots); ``max_cpu_loras``: host-memory adapter cache
            (default: ``max_loras``, vLLM's default).
        on_event: called synchronously with every router event.
        kv_capacity_tokens / max_num_batched_tokens / max_num_seqs: override the profile's values.
        sample_interval_s: period of ``LoadSample`` events (engine clock).
        cpu_kv_tokens: size of the CPU KV tier in tokens (:mod:`.kv_offload`); 0: no tier.
    """

    def __init__(
        self,
        profile: GpuProfile | str = "H100",
        replica_id: str = "sim-0",
        block_size: int = 16,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        on_event: EventCallback | None = None,
        *,
        kv_capacity_tokens: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        sample_interval_s: float = 0.1,
        enable_prefix_caching: bool = True,
        default_adapter_mb: float | None = None,
        keep_records: int = 1_000_000,
        cpu_kv_tokens: int = 0,
    ) -> None:
        self.profile = resolve_profile(profile)
        p = self.profile
        self.replica_id = replica_id
        self.block_size = block_size
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max_loras
        self.max_num_batched_tokens = max_num_batched_tokens or p.max_num_batched_tokens
        self.max_num_seqs = max_num_seqs or p.max_num_seqs
        kv_tokens = kv_capacity_tokens or p.kv_capacity_tokens
        self.pool = BlockPool(max(1, kv_tokens // block_size), block_size)
        # CPU KV tier (vLLM's CPU offloading connector / LMCache), see .kv_offload; None: no tier.
        self.cpu_kv = CpuKvTier(cpu_kv_tokens // block_size) if cpu_kv_tokens >= block_size else None
        self.on_event = on_event
        self.sample_interval_s = sample_interval_s
        self.enable_prefix_caching = enable_prefix_caching
        self.lora = AdapterSlots(
            replica_id,
            p,
            max_loras,
            self.max_cpu_loras,
            self._emit,
            default_adapter_mb if default_adapter_mb is not None else adapter_mb(16),
        )
        self.metrics = EngineMetrics(keep_records=keep_records)
        self._b0, self._b1, self._b2 = p.b0_us * 1e-6, p.b1_us * 1e-6, p.b2_us * 1e-6
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.seqs: dict[str, SimSeq] = {}
        self._waiting_prefill = 0
        self._pending_loads: list[tuple[str, str, float | None]] = []
        self._step: Step | None = None
        self._last_sample = -1e18
        self.now = 0.0

    # ---- events -----------------------------------------------------------------------------------
    def _emit(self, ev: EngineEvent) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def _flush_blocks(self) -> None:
        pool = self.pool
        cpu = self.cpu_kv
        if pool.stored or pool.removed:
            stored, removed = pool.drain()
            if cpu is not None:
                cpu.store(stored)  # write-through to host memory
            if self.on_event is not None:
                if removed:
                    self.on_event(BlockRemoved(self.replica_id, tuple(removed)))
                if stored:
                    self.on_event(BlockStored(self.replica_id, tuple(stored)))
        if cpu is not None and (cpu.stored or cpu.removed):
            c_stored, c_removed = cpu.drain()
            if self.on_event is not None:
                if c_removed:
                    self.on_event(BlockRemoved(self.replica_id, tuple(c_removed), medium="cpu"))
                if c_stored:
                    self.on_event(BlockStored(self.replica_id, tuple(c_stored), medium="cpu"))

    # ---- requests ---------------------------------------------------------------------------------
    @property
    def num_in_system(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_loads)

    @property
    def busy(self) -> bool:
        """Whether a step is in flight."""
        return self._step is not None

    def add_request(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        block_hashes: Sequence[int] = (),
        *,
        adapter: str | None = None,
        adapter_mb: float | None = None,
        output_block_hashes: Sequence[int] | None = None,
        now: float | None = None,
        user: Any = None,
    ) -> SimSeq:
        """Queue a request (it joins the batch at the next step). ``block_hashes``: chained hashes of the
        prompt's full blocks (at this engine's ``block_size``); ``output_block_hashes``: the chain's
        continuation over the blocks the output fills (lets a follow-up turn hit the answer's KV)."""
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError(f"prompt_tokens and max_tokens must be >= 1 (got {prompt_tokens}, {max_tokens})")
        need = self.pool.blocks_for(prompt_tokens + max_tokens)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"request {request_id!r} needs {need} KV blocks, the cache has {self.pool.num_blocks}"
            )
        t = self.now if now is None else now
        if t > self.now:
            self.now = t
        hashes = list(block_hashes)[: prompt_tokens // self.block_size]
        if output_block_hashes:
            hashes.extend(output_block_hashes)
        seq = SimSeq(request_id, prompt_tokens, max_tokens, hashes, adapter, adapter_mb, t, user)
        bs = self.block_size
        hit = self.pool.match_len(hashes, (prompt_tokens - 1) // bs) if self.enable_prefix_caching else 0
        if self.cpu_kv is not None and self.enable_prefix_caching:
            hit += self.cpu_kv.match_from(hashes, hit, (prompt_tokens - 1) // bs)
        seq.expected_uncached = prompt_tokens - hit * bs
        self.metrics.advance(t, self.num_in_system)
        self.seqs[request_id] = seq
        self.waiting.append(seq)
        self._waiting_prefill += seq.expected_uncached
        return seq

    def abort(self, request_id: str, now: float | None = None) -> bool:
        """Drop a request (waiting or running); frees its blocks. False if unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        t = self.now if now is None else now
        self.metrics.advance(t, self.num_in_system)
        if seq.status == WAITING:
            self.waiting.remove(seq)
            self._waiting_prefill -= seq.expected_uncached
        elif seq.status == RUNNING:
            self.running.remove(seq)
            self.pool.free_blocks(seq.blocks)
            seq.blocks = []
        seq.status = ABORTED
        seq.finish = t
        self._record(seq, aborted=True)
        self._flush_blocks()
        return True

    def load_adapter(self, name: str, tier: str = "gpu", size_mb: float | None = None) -> None:
        """Load an adapter into ``tier`` ("gpu" or "cpu"); done (and its time charged) in the next step."""
        if tier not in ("gpu", "cpu"):
            raise ValueError(f"unknown adapter tier {tier!r}; expected 'gpu' or 'cpu'")
        self._pending_loads.append((name, tier, size_mb))

    def unload_adapter(self, name: str, tier: str = "") -> str:
        """Demote (``tier="gpu"``: to host memory) or forget an adapter now; returns its resulting tier.
        Refused (RuntimeError) while a running request uses it."""
        pinned = {s.adapter for s in self.running if s.adapter is not None}
        return self.lora.unload(name, tier, pinned)

    def adapter_tier(self, name: str | None) -> str:
        return self.lora.tier(name)

    def resident_blocks(self) -> list[int]:
        return list(self.pool.cached)

    # ---- stepping ---------------------------------------------------------------------------------
    def schedule_step(self, now: float, max_steps: int = 1) -> Step | None:
        """Plan the next step at ``now`` (allocating its KV blocks); None when there is nothing to do.

        ``max_steps > 1`` lets a pure-decode batch that cannot change before its next finish run as one
        macro step of up to ``max_steps`` identical steps (virtual time only)."""
        if self._step is not None:
            raise RuntimeError("a step is already in flight; finish it first")
        if now > self.now:
            self.now = now
        pool = self.pool
        bs = self.block_size
        budget = self.max_num_batched_tokens
        running = self.running
        sched: list[tuple[SimSeq, int]] = []
        prefill = decode = 0
        preempted = False
        load_s = 0.0
        loaded: list[str] = []

        if self._pending_loads:
            pinned = {s.adapter for s in running if s.adapter is not None}
            for name, tier, size in self._pending_loads:
                try:
                    load_s += self.lora.load(name, tier, pinned, size)
                    loaded.append(name)
                except RuntimeError:
                    loaded.append(name)  # no slot: the caller sees the resulting tier
            self._pending_loads = []

        # 1. running requests, in order; preempt from the tail when out of blocks
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            new = seq.prompt_tokens + seq.num_output - seq.num_computed
            if new > budget:
                new = budget
            need = -(-(seq.num_computed + new) // bs) - len(seq.blocks)
            scheduled = True
            while need > pool.num_free:
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            if need > 0:
                seq.blocks.extend(pool.allocate(need))
            sched.append((seq, new))
            budget -= new
            if new == 1 and seq.num_output > 0 and seq.num_computed == seq.num_tokens - 1:
                decode += 1
            else:
                prefill += new
            i += 1

        # 2. waiting requests, FCFS, while budget, sequence slots and blocks allow
        admitted = 0
        if not preempted and self.waiting:
            waiting = self.waiting
            lora = self.lora
            in_batch = {s.adapter for s, _ in sched if s.adapter is not None}
            skipped: list[SimSeq] = []
            caching = self.enable_prefix_caching
            cpu_kv = self.cpu_kv if caching else None
            m = self.metrics
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = waiting[0]
                a = seq.adapter
                if (
                    a is not None
                    and a not in in_batch
                    and (len(in_batch) >= self.max_loras or not lora.can_activate(a, in_batch))
                ):
                    skipped.append(waiting.popleft())
                    continue
                ntok = seq.num_tokens
                hits = pool.match(seq.hashes, (ntok - 1) // bs) if caching else []
                n_cpu = cpu_kv.match_from(seq.hashes, len(hits), (ntok - 1) // bs) if cpu_kv else 0
                computed = (len(hits) + n_cpu) * bs
                new = ntok - computed
                if new > budget:
                    new = budget
                need = -(-(computed + new) // bs) - len(hits)
                if need > pool.num_free - pool.num_evictable(hits):
                    break
                if a is not None:
                    if a in in_batch:
                        lora.touch(a)
                    else:
                        cost = lora.activate(a, in_batch, seq.adapter_mb)
                        if cost is None:  # pragma: no cover - excluded by can_activate above
                            skipped.append(waiting.popleft())
                            continue
                        load_s += cost
                        in_batch.add(a)
                pool.touch(hits)
                seq.blocks = hits + pool.allocate(need) if need > 0 else hits
                seq.num_computed = computed
                seq.num_cached = len(hits)
                if n_cpu and cpu_kv is not None:  # copied back from host memory, then GPU-cached
                    k0 = len(hits)
                    cpu_kv.touch(seq.hashes[k0 : k0 + n_cpu])
                    for k in range(k0, k0 + n_cpu):
                        pool.cache_block(seq.blocks[k], seq.hashes[k])
                    seq.num_cached = k0 + n_cpu
                    load_s += self.profile.kv_load_s(n_cpu * bs)
                    m.cpu_kv_hits += n_cpu * bs
                m.prefix_cache_queries += ntok
                m.prefix_cache_hits += computed
                if seq.cached_tokens < 0:
                    seq.cached_tokens = computed
                waiting.popleft()
                self._waiting_prefill -= seq.expected_uncached
                seq.status = RUNNING
                running.append(seq)
                sched.append((seq, new))
                prefill += new
                budget -= new
                admitted += 1
            if skipped:
                waiting.extendleft(reversed(skipped))

        self._flush_blocks()
        if not sched and load_s == 0.0 and not loaded:
            return None
        step_s = self._b0 + self._b1 * prefill + self._b2 * decode if sched else 0.0
        n = 1
        if (
            max_steps > 1
            and prefill == 0
            and not preempted
            and admitted == 0
            and load_s == 0.0
            and not loaded
            and len(sched) == len(running)
        ):
            n = min(max_steps, min(s.max_tokens - s.num_output for s in running))
            if n > 1:
                extra = sum(-(-(s.num_computed + n) // bs) - len(s.blocks) for s in running)
                if extra > pool.num_free:
                    n = 1
        step = Step(now, step_s, load_s, n, sched, prefill, decode, loaded)
        self._step = step
        return step

    def truncate_step(self, step: Step, t: float) -> float:
        """Cut a macro step short at the first step boundary at or after ``t``; returns its new end."""
        if step.n_steps > 1 and t < step.end:
            done = int((t - step.start - step.load_s) / step.step_s) + 1 if step.step_s > 0 else 1
            step.n_steps = max(1, min(step.n_steps, done))
        return step.end

    def _preempt(self, seq: SimSeq) -> None:
        self.pool.free_blocks(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_cached = 0
        seq.status = WAITING
        seq.preemptions += 1
        seq.expected_uncached = seq.num_tokens
        self._waiting_prefill += seq.expected_uncached
        self.metrics.num_preemptions_total += 1
        self.waiting.appendleft(seq)

    def finish_step(self, step: Step) -> list[StepOutput]:
        """Apply a planned step at its end time; returns the tokens it produced per request."""
        if step is not self._step:
            raise RuntimeError("not the step in flight")
        self._step = None
        end = step.end
        self.now = max(self.now, end)
        n = step.n_steps
        pool = self.pool
        bs = self.block_size
        m = self.metrics
        m.steps_total += n
        m.busy_seconds += step.duration
        out: list[StepOutput] = []
        done = 0
        gen_total = 0
        for seq, new in step.scheduled:
            if seq.status != RUNNING:
                continue  # aborted while the step ran
            if n > 1:
                need = -(-(seq.num_computed + n) // bs) - len(seq.blocks)
                if need > 0:
                    seq.blocks.extend(pool.allocate(need))
                seq.num_computed += n
                seq.num_output += n
                gen = n
            else:
                seq.num_computed += new
                if seq.num_computed >= seq.prompt_tokens + seq.num_output:
                    seq.num_output += 1
                    gen = 1
                else:
                    gen = 0
            full = seq.num_computed // bs
            hashes = seq.hashes
            if full > len(hashes):
                full = len(hashes)
            if full > seq.num_cached:
                blocks = seq.blocks
                for k in range(seq.num_cached, full):
                    pool.cache_block(blocks[k], hashes[k])
                seq.num_cached = full
            if gen:
                gen_total += gen
                first = seq.first_token is None
                if first:
                    seq.first_token = end
                finished = seq.num_output >= seq.max_tokens
                if finished:
                    if done == 0:
                        m.advance(end, self.num_in_system)
                    done += 1
                    seq.status = FINISHED
                    seq.finish = end
                    pool.free_blocks(seq.blocks)
                    seq.blocks = []
                    del self.seqs[seq.request_id]
                    m.request_success_total += 1
                    m.prompt_tokens_total += seq.prompt_tokens
                    self._record(seq)
                out.append((seq, gen, first, finished))
        m.generation_tokens_total += gen_total
        if done:
            self.running = [s for s in self.running if s.status == RUNNING]
        self._flush_blocks()
        if self.on_event is not None and (
            end - self._last_sample >= self.sample_interval_s or not (self.running or self.waiting)
        ):
            self._last_sample = end
            self.on_event(self.load_sample(end))
        return out

    def step(self, now: float) -> tuple[Step, list[StepOutput]] | None:
        """Plan and apply one step at ``now`` (for simple drivers and tests)."""
        st = self.schedule_step(now)
        if st is None:
            return None
        return st, self.finish_step(st)

    def _record(self, seq: SimSeq, aborted: bool = False) -> None:
        self.metrics.record(
            RequestRecord(
                seq.request_id,
                seq.arrival,
                seq.first_token,
                seq.finish if seq.finish is not None else self.now,
                seq.prompt_tokens,
                seq.num_output,
                max(0, seq.cached_tokens),
                seq.preemptions,
                seq.adapter,
                aborted,
            )
        )

    # ---- observation ------------------------------------------------------------------------------
    def waiting_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill: queued requests (net of their prefix hit on arrival) plus the
        unfinished chunks of running ones."""
        tail = sum(s.prompt_tokens - s.num_computed for s in self.running if s.num_computed < s.prompt_tokens)
        return max(0, self._waiting_prefill) + tail

    def load_sample(self, now: float | None = None) -> LoadSample:
        pool = self.pool
        return LoadSample(
            self.replica_id,
            self.now if now is None else now,
            len(self.running),
            len(self.waiting),
            self.waiting_prefill_tokens(),
            (pool.num_blocks - pool.num_free) * self.block_size,
            pool.usage,
        )

    def stats(self) -> dict[str, Any]:
        """vLLM-named gauges and counters, plus the sim's own (busy time, adapter loads, residency)."""
        m = self.metrics
        out: dict[str, Any] = {
            "vllm:num_requests_running": len(self.running),
            "vllm:num_requests_waiting": len(self.waiting),
            "vllm:kv_cache_usage_perc": self.pool.usage,
            **m.counters(),
            "vllm:lora_requests_info": {
                "running_lora_adapters": sorted({s.adapter for s in self.running if s.adapter}),
                "waiting_lora_adapters": sorted({s.adapter for s in self.waiting if s.adapter}),
                "max_lora": self.max_loras,
            },
            "sim:steps_total": m.steps_total,
            "sim:busy_seconds": m.busy_seconds,
            "sim:adapter_loads": dict(self.lora.loads),
            "sim:adapter_load_seconds": self.lora.load_seconds,
            "sim:adapters_gpu": list(self.lora.gpu),
            "sim:adapters_cpu": [a for a in self.lora.cpu if a not in self.lora.gpu],
            "sim:cached_blocks": len(self.pool.cached),
            "sim:num_blocks": self.pool.num_blocks,
            "sim:clock": self.now,
        }
        return out
