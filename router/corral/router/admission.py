"""Admission control of one router: per-tenant token buckets and concurrency slots, and a bounded wait
queue drained by weighted fair queueing between tenants (RoutingPolicy ``spec.admission``).

:class:`Admission` owns the runtime; :mod:`corral.api.admission` owns the schema and defaults. Per request,
the router calls ``await admission.admit(tenant, model, tokens)`` before it routes, and releases the
returned :class:`Ticket` when the request ends, on every path (``Ticket.release`` is idempotent):

1. the tenant's buckets (requests/s, tokens/s) must hold the request's cost, else :class:`Rejected`
   at once with the time until they will (a request larger than the token bucket is :class:`TooLarge`);
2. it goes on at once when nobody of its tenant waits, the tenant is under ``maxConcurrency`` and the
   model has a free replica queue slot (a replica under ``spec.load.maxQueueRequestsPerReplica``: the same
   test the router core's ``route`` makes);
3. else it waits, unless the queue is full (``maxWaiting``) or its estimated wait exceeds ``maxWaitMs``
   (both :class:`Rejected` at once). Waiters are granted in start-time fair queueing order (each grant
   to a tenant of weight ``w`` advances that tenant's virtual time by ``1/w``; the next grant goes to the
   tenant whose head waiter has the lowest start tag), so backlogged tenants get capacity in proportion
   to their weights; a waiter still waiting after ``maxWaitMs`` is :class:`Rejected`. A request refused
   here, or that leaves while waiting, gets its bucket tokens back: it was never let in.

Grants happen when capacity may have freed: a ticket released, a request's first token (``kick``) and a
short poll while anyone waits (engines' load samples move the queue bound too). A grant reserves one
replica queue slot of the model until the granted request routes, so one free slot wakes one waiter.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from corral.api.admission import AdmissionSpec, TenantLimits

from .core import SAMPLE_MAX_AGE_S
from .policies._common import waiting_load

ANONYMOUS = "anonymous"
"""The metrics label of requests without a tenant (auth off)."""

POLL_S = 0.02
"""How often the queue is re-checked while requests wait (besides releases and first tokens)."""

RATE_WINDOW_S = 2.0
"""Window over which the drain rate (completions/s) used for wait estimates is measured."""

REJECT_REASONS = ("rate", "tokens", "queue_full", "wait_estimate", "timeout", "too_large")


class Rejected(Exception):
    """Refused by admission (HTTP 429 / RESOURCE_EXHAUSTED) with a ``Retry-After`` estimate."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class TooLarge(Exception):
    """A request that costs more tokens than its tenant's token bucket holds: never admissible (400)."""


class TokenBucket:
    """``rate`` per second, at most ``burst``; starts full."""

    __slots__ = ("burst", "rate", "t", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, now

    def refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        self.refill(now)
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def take(self, n: float) -> None:
        self.tokens -= n


def _bucket(rate: float | None, burst: int | None, now: float) -> TokenBucket | None:
    if rate is None:
        return None
    return TokenBucket(rate, float(burst if burst is not None else max(1, math.ceil(rate))), now)


@dataclass(slots=True, eq=False)
class _Waiter:
    tenant: _Tenant
    model: str
    fut: asyncio.Future[None]
    since: float
    timer: asyncio.TimerHandle | None = None
    granted: bool = False


@dataclass(slots=True, eq=False)
class _Tenant:
    name: str
    limits: TenantLimits
    where: str  # the spec path of its limits, for messages
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    inflight: int = 0
    finish_tag: float = 0.0
    queue: deque[_Waiter] = field(default_factory=deque)
    counts: dict[str, int] = field(default_factory=dict)  # admitted, queued, rejected_<reason>

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def label(self) -> str:
        return self.name or ANONYMOUS


class Ticket:
    """One admitted request's concurrency slot; :meth:`release` it when the request ends (idempotent)."""

    __slots__ = ("_adm", "_done", "_tenant")

    def __init__(self, adm: Admission, tenant: _Tenant) -> None:
        self._adm, self._tenant, self._done = adm, tenant, False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._adm._release(self._tenant)


def free_slots(core: Any, model: str) -> float:
    """Free replica queue slots of ``model`` in a :class:`~corral.router.core.RouterCore` (replicas under
    the queue bound, as ``route`` counts them); infinite when no replica serves it (routing then says
    why)."""
    members = core.fleet.candidates(model)
    if not members:
        return math.inf
    bound = core.settings.max_queue_per_replica
    now = core.now()
    held = core.held  # requests a holding policy keeps at the router for a replica count as sent to it
    return float(
        sum(
            max(0, bound - waiting_load(r, now, SAMPLE_MAX_AGE_S) - len(held.queue(r.replica_id)))
            for r in members
        )
    )


class Admission:
    """Admission control of one router (see the module docstring). ``capacity(model)`` is the number of
    free replica queue slots of ``model`` now (:func:`free_slots`)."""

    def __init__(
        self,
        spec: AdmissionSpec | None = None,
        capacity: Callable[[str], float] = lambda model: math.inf,
        clock: Callable[[], float] = time.monotonic,
        load_field: str = "spec.load.maxQueueRequestsPerReplica",
    ) -> None:
        self.spec = spec or AdmissionSpec()
        self.capacity = capacity
        self.clock = clock
        self.load_field = load_field
        self.tenants: dict[str, _Tenant] = {}
        self.vtime = 0.0
        self.waiting = 0
        self.reserved: dict[str, int] = {}  # model -> granted, not yet routed
        self._done: deque[float] = deque()  # release times within RATE_WINDOW_S
        self._poll: asyncio.TimerHandle | None = None

    # ---- configuration --------------------------------------------------------------------------------
    def configure(self, spec: AdmissionSpec) -> None:
        """New limits live: buckets keep their fill (capped at the new burst); waiters stay queued."""
        self.spec = spec
        now = self.clock()
        for t in self.tenants.values():
            self._set_limits(t, now)
        self.kick()

    def _set_limits(self, t: _Tenant, now: float) -> None:
        lim = self.spec.limits(t.name)
        t.limits = lim
        t.where = _where(self.spec, t.name)
        for attr, rate, burst in (
            ("requests", lim.requests_per_second, lim.burst_requests),
            ("tokens", lim.tokens_per_second, lim.burst_tokens),
        ):
            old: TokenBucket | None = getattr(t, attr)
            new = _bucket(rate, burst, now)
            if new is not None and old is not None:
                old.refill(now)
                new.tokens = min(new.burst, old.tokens)
            setattr(t, attr, new)

    def tenant(self, name: str | None) -> _Tenant:
        key = name or ""
        t = self.tenants.get(key)
        if t is None:
            t = self.tenants[key] = _Tenant(key, self.spec.default_tenant, "")
            self._set_limits(t, self.clock())
        return t

    # ---- the request path -----------------------------------------------------------------------------
    async def admit(self, tenant: str | None, model: str, tokens: int = 0) -> Ticket:
        """Admit one request of ``tenant`` for ``model`` costing ``tokens`` (prompt + max_tokens), waiting
        for capacity if need be. Raises :class:`Rejected` or :class:`TooLarge`."""
        t = self.tenant(tenant)
        now = self.clock()
        self._check_rate(t, tokens, now)
        self.kick()  # waiters that can go now go first
        lim = t.limits
        under = lim.max_concurrency is None or t.inflight < lim.max_concurrency
        if under and not t.queue and self.capacity(model) - self.reserved.get(model, 0) > 0:
            self._advance(t)
            return self._grant_now(t)
        spec = self.spec
        if self.waiting >= spec.max_waiting or spec.max_wait_ms <= 0:
            t.count("rejected_queue_full")
            why = self._why(t, model)
            if spec.max_waiting == 0 or spec.max_wait_ms <= 0:
                msg = f"{why}; retry later (no waiting: spec.admission.maxWaiting or maxWaitMs is 0)"
            else:
                msg = (
                    f"{why}, and the router's wait queue is full (spec.admission.maxWaiting = "
                    f"{spec.max_waiting}); retry later"
                )
            self._refund(t, tokens)
            raise Rejected(msg, self._retry_after(t), "queue_full")
        est = self._estimate(t)
        max_wait = spec.max_wait_ms / 1000.0
        if est is not None and est > max_wait:
            t.count("rejected_wait_estimate")
            self._refund(t, tokens)
            raise Rejected(
                f"{self._why(t, model)}; the estimated wait of {est:.2f} s is over spec.admission.maxWaitMs "
                f"= {spec.max_wait_ms:g}; retry later",
                max(est - max_wait, 0.1),
                "wait_estimate",
            )
        loop = asyncio.get_running_loop()
        w = _Waiter(t, model, loop.create_future(), now)
        t.queue.append(w)
        t.count("queued")
        self.waiting += 1
        w.timer = loop.call_later(max_wait, self._expire, w)
        self._ensure_poll(loop)
        try:
            await w.fut
        except BaseException:
            if w.granted:  # granted, then cancelled before it could route: give the slot back
                self._unreserve(model)
                self._release(t, completed=False)
            else:  # timed out, or the client left: never let in, so not charged to the tenant's rate
                self._refund(t, tokens)
            raise
        finally:
            if w.timer is not None:
                w.timer.cancel()
            if not w.granted and _discard(t.queue, w):
                self.waiting -= 1
        self._unreserve(model)
        return Ticket(self, t)

    def kick(self) -> None:
        """Capacity may have freed (a first token, a release): grant what can go now."""
        if self.waiting:
            self._pump()

    # ---- internals ------------------------------------------------------------------------------------
    def _check_rate(self, t: _Tenant, tokens: int, now: float) -> None:
        rb, tb = t.requests, t.tokens
        if tb is not None and tokens > tb.burst:
            t.count("rejected_too_large")
            raise TooLarge(
                f"the request costs {tokens} tokens (prompt + field 'max_tokens'), more than tenant "
                f"'{t.label}' may ever send at once ({t.where}.burstTokens = {tb.burst:g}): lower max_tokens "
                "or shorten the prompt"
            )
        wr = rb.wait_s(1, now) if rb is not None else 0.0
        wt = tb.wait_s(tokens, now) if tb is not None else 0.0
        if wr > 0 or wt > 0:
            if wr >= wt:
                assert rb is not None
                t.count("rejected_rate")
                what = f"request rate ({t.where}.requestsPerSecond = {rb.rate:g}, burst {rb.burst:g})"
                reason = "rate"
            else:
                assert tb is not None
                t.count("rejected_tokens")
                what = f"token rate ({t.where}.tokensPerSecond = {tb.rate:g}, burst {tb.burst:g})"
                reason = "tokens"
            wait = max(wr, wt)
            raise Rejected(f"tenant '{t.label}' is over its {what}; retry in {wait:.2f} s", wait, reason)
        if rb is not None:
            rb.take(1)
        if tb is not None:
            tb.take(tokens)

    @staticmethod
    def _refund(t: _Tenant, tokens: int) -> None:
        """Give back what :meth:`_check_rate` took for a request that was not let in after all."""
        if t.requests is not None:
            t.requests.tokens = min(t.requests.burst, t.requests.tokens + 1)
        if t.tokens is not None:
            t.tokens.tokens = min(t.tokens.burst, t.tokens.tokens + tokens)

    def _start(self, t: _Tenant) -> float:
        """Start tag of ``t``'s next grant (start-time fair queueing; tags advance only on grants, so a
        tenant whose waiters time out or leave is not set back)."""
        return max(self.vtime, t.finish_tag)

    def _advance(self, t: _Tenant) -> None:
        """``t`` is granted one request: system virtual time moves to its start tag."""
        self.vtime = start = self._start(t)
        t.finish_tag = start + 1.0 / t.limits.weight

    def _grant_now(self, t: _Tenant) -> Ticket:
        t.inflight += 1
        t.count("admitted")
        return Ticket(self, t)

    def _pump(self) -> None:
        free: dict[str, float] = {}
        while self.waiting:
            best: _Waiter | None = None
            best_tag = math.inf
            for t in self.tenants.values():
                if not t.queue:
                    continue
                mc = t.limits.max_concurrency
                if mc is not None and t.inflight >= mc:
                    continue
                w = t.queue[0]
                tag = self._start(t)
                if tag >= best_tag:
                    continue
                if w.model not in free:
                    free[w.model] = self.capacity(w.model) - self.reserved.get(w.model, 0)
                if free[w.model] > 0:
                    best, best_tag = w, tag
            if best is None:
                return
            t = best.tenant
            t.queue.popleft()
            self.waiting -= 1
            free[best.model] -= 1
            self.reserved[best.model] = self.reserved.get(best.model, 0) + 1
            self._advance(t)
            best.granted = True
            t.inflight += 1
            t.count("admitted")
            if not best.fut.done():
                best.fut.set_result(None)

    def _unreserve(self, model: str) -> None:
        n = self.reserved.get(model, 0) - 1
        if n > 0:
            self.reserved[model] = n
        else:
            self.reserved.pop(model, None)

    def _release(self, t: _Tenant, completed: bool = True) -> None:
        t.inflight -= 1
        if completed:
            now = self.clock()
            done = self._done
            done.append(now)
            while done and done[0] < now - RATE_WINDOW_S:
                done.popleft()
        self.kick()

    def _expire(self, w: _Waiter) -> None:
        if w.granted or w.fut.done():
            return
        t = w.tenant
        if _discard(t.queue, w):
            self.waiting -= 1
        t.count("rejected_timeout")
        w.fut.set_exception(
            Rejected(
                f"{self._why(t, w.model)}; waited spec.admission.maxWaitMs = {self.spec.max_wait_ms:g} "
                "without capacity; retry later",
                self._retry_after(t),
                "timeout",
            )
        )

    def _ensure_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poll is None:
            self._poll = loop.call_later(POLL_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._poll = None
        self.kick()
        if self.waiting:
            self._ensure_poll(loop)

    def drain_rate(self) -> float | None:
        """Requests completed per second over the last :data:`RATE_WINDOW_S` (None: too few to tell)."""
        done = self._done
        now = self.clock()
        while done and done[0] < now - RATE_WINDOW_S:
            done.popleft()
        if len(done) < 4:
            return None
        return len(done) / RATE_WINDOW_S

    def _ahead(self, t: _Tenant) -> float:
        """Grants until a new request of ``t`` goes, under fair queueing: its own queue plus it, and for
        each other tenant with waiters, its weight's worth of grants per grant of ``t`` (a backlogged
        tenant is assumed to stay backlogged: the wait ``t`` is guaranteed, not the best case)."""
        mine = len(t.queue) + 1
        w = t.limits.weight
        return mine + sum(mine * o.limits.weight / w for o in self.tenants.values() if o is not t and o.queue)

    def _estimate(self, t: _Tenant) -> float | None:
        rate = self.drain_rate()
        return None if rate is None else self._ahead(t) / rate

    def _retry_after(self, t: _Tenant) -> float:
        est = self._estimate(t)
        return max(0.1, est - self.spec.max_wait_ms / 1000.0) if est is not None else 1.0

    def _why(self, t: _Tenant, model: str) -> str:
        mc = t.limits.max_concurrency
        if mc is not None and t.inflight >= mc:
            return f"tenant '{t.label}' has {t.inflight} requests in flight ({t.where}.maxConcurrency = {mc})"
        return f"every replica of model '{model}' is at its queue bound (RoutingPolicy {self.load_field})"

    # ---- observation ----------------------------------------------------------------------------------
    def stats(self) -> Iterator[tuple[str, int, int, dict[str, int]]]:
        """(tenant label, waiting, in flight, counts) per tenant seen."""
        for t in self.tenants.values():
            yield t.label, len(t.queue), t.inflight, dict(t.counts)


def _where(spec: AdmissionSpec, name: str) -> str:
    for i, t in enumerate(spec.tenants):
        if t.name == name:
            return f"spec.admission.tenants[{i}]"
    return "spec.admission.defaultTenant"


def _discard(q: deque[_Waiter], w: _Waiter) -> bool:
    try:
        q.remove(w)
    except ValueError:
        return False
    return True
