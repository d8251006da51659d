"""Admission control (corral.router.admission): token buckets, concurrency slots, the bounded wait queue,
weighted fair queueing between tenants, and that every slot comes back on every path."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from corral.api.admission import AdmissionSpec
from corral.router.admission import Admission, Rejected, Ticket, TokenBucket, TooLarge
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Fleet:
    """Replica queue slots of one model: ``slots`` in all, ``used`` by routed, unfinished requests."""

    def __init__(self, slots: float) -> None:
        self.slots, self.used = slots, 0

    def capacity(self, model: str) -> float:
        return self.slots - self.used


def make(spec: dict[str, Any], slots: float = 1e9) -> tuple[Admission, Fleet, Clock]:
    fleet, clock = Fleet(slots), Clock()
    return Admission(AdmissionSpec.model_validate(spec), fleet.capacity, clock), fleet, clock


def invariants(adm: Admission) -> None:
    assert adm.waiting == sum(len(t.queue) for t in adm.tenants.values()) >= 0
    assert all(t.inflight >= 0 for t in adm.tenants.values())
    assert all(n > 0 for n in adm.reserved.values())
    for t in adm.tenants.values():
        for b in (t.requests, t.tokens):
            assert b is None or 0 <= b.tokens <= b.burst


async def test_admits_at_once_and_release_is_idempotent() -> None:
    adm, _, _ = make({})
    t1 = await adm.admit(None, "m", 10)
    t2 = await adm.admit("acme", "m", 10)
    assert adm.tenant(None).inflight == 1 and adm.tenant("acme").inflight == 1
    t1.release()
    t1.release()
    t2.release()
    assert adm.tenant(None).inflight == 0 and adm.tenant("acme").inflight == 0
    assert dict(adm.tenant("acme").counts) == {"admitted": 1}
    assert [s[0] for s in adm.stats()] == ["anonymous", "acme"]  # names only, never keys


async def test_request_rate_limit_with_burst_and_honest_retry_after() -> None:
    adm, _, clock = make({"tenants": [{"name": "a", "requestsPerSecond": 2, "burstRequests": 3}]})
    for _ in range(3):
        (await adm.admit("a", "m")).release()
    with pytest.raises(Rejected) as e:
        await adm.admit("a", "m")
    assert e.value.reason == "rate" and e.value.retry_after_s == pytest.approx(0.5)
    assert "spec.admission.tenants[0].requestsPerSecond = 2" in str(e.value)
    await adm.admit("b", "m")  # another tenant (defaultTenant: unlimited) is not affected
    clock.t += 0.5
    await adm.admit("a", "m")  # exactly one token back after Retry-After
    with pytest.raises(Rejected):
        await adm.admit("a", "m")


async def test_token_rate_and_requests_larger_than_the_bucket() -> None:
    adm, _, clock = make({"defaultTenant": {"tokensPerSecond": 100, "burstTokens": 300}})
    with pytest.raises(TooLarge, match=r"301 tokens.*'max_tokens'.*defaultTenant.burstTokens = 300"):
        await adm.admit("x", "m", 301)
    await adm.admit("x", "m", 250)
    with pytest.raises(Rejected) as e:
        await adm.admit("x", "m", 100)
    assert e.value.reason == "tokens" and e.value.retry_after_s == pytest.approx(0.5)
    clock.t += 0.5
    await adm.admit("x", "m", 100)


def test_burst_needs_its_rate() -> None:
    with pytest.raises(ValidationError, match="burstTokens: needs tokensPerSecond"):
        AdmissionSpec.model_validate({"tenants": [{"name": "a", "burstTokens": 5}]})
    with pytest.raises(ValidationError, match="Duplicate value"):
        AdmissionSpec.model_validate({"tenants": [{"name": "a"}, {"name": "a"}]})


def test_token_bucket_never_negative_and_capped() -> None:
    b = TokenBucket(10.0, 5.0, 0.0)
    assert b.wait_s(5, 0.0) == 0
    b.take(5)
    assert b.wait_s(1, 0.0) == pytest.approx(0.1)
    assert b.wait_s(1, 100.0) == 0 and b.tokens == 5.0


async def test_concurrency_limit_queues_and_a_release_grants_the_next() -> None:
    adm, _, _ = make({"tenants": [{"name": "a", "maxConcurrency": 1}]})
    first = await adm.admit("a", "m")
    second = asyncio.create_task(adm.admit("a", "m"))
    await asyncio.sleep(0)
    assert adm.waiting == 1 and not second.done()
    other = await adm.admit("b", "m")  # other tenants go on
    first.release()
    t2 = await asyncio.wait_for(second, 5)
    assert adm.waiting == 0 and adm.tenant("a").inflight == 1
    t2.release()
    other.release()
    invariants(adm)


async def test_saturated_fleet_queue_full_is_429_at_once() -> None:
    adm, fleet, _ = make({"maxWaiting": 1}, slots=0)
    waiter = asyncio.create_task(adm.admit("a", "m"))
    await asyncio.sleep(0)
    with pytest.raises(Rejected) as e:
        await adm.admit("b", "m")
    assert e.value.reason == "queue_full" and "maxWaiting = 1" in str(e.value)
    assert "maxQueueRequestsPerReplica" in str(e.value) and e.value.retry_after_s > 0
    fleet.slots = 1
    adm.kick()
    (await asyncio.wait_for(waiter, 5)).release()
    adm2, _, _ = make({"maxWaiting": 0}, slots=0)
    with pytest.raises(Rejected, match="no waiting"):
        await adm2.admit("a", "m")


async def test_a_waiter_gets_429_after_max_wait() -> None:
    adm, _, _ = make({"maxWaitMs": 30}, slots=0)
    with pytest.raises(Rejected) as e:
        await asyncio.wait_for(adm.admit("a", "m"), 5)
    assert e.value.reason == "timeout" and "maxWaitMs = 30" in str(e.value)
    assert adm.waiting == 0 and adm.tenant("a").counts["rejected_timeout"] == 1


async def test_estimated_wait_over_the_bound_is_rejected_at_once() -> None:
    adm, fleet, _ = make({"maxWaitMs": 1000}, slots=1)
    for _ in range(8):  # 8 completions within the window: a drain rate of 4/s
        (await adm.admit("a", "m")).release()
    fleet.slots = 0
    tasks = [asyncio.create_task(adm.admit("a", "m")) for _ in range(4)]
    await asyncio.sleep(0)
    assert adm.waiting == 4  # the 4th: 3 ahead + itself at 4/s = 1 s, still fits
    with pytest.raises(Rejected) as e:
        await adm.admit("a", "m")  # 5 at 4/s = 1.25 s > 1 s
    assert e.value.reason == "wait_estimate" and e.value.retry_after_s == pytest.approx(0.25)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.waiting == 0
    invariants(adm)


async def test_cancelled_waiters_leak_nothing() -> None:
    adm, fleet, _ = make({}, slots=0)
    tasks = [asyncio.create_task(adm.admit(f"t{i % 3}", "m")) for i in range(9)]
    await asyncio.sleep(0)
    assert adm.waiting == 9
    tasks[0].cancel()  # cancelled while waiting
    fleet.slots = 1
    adm.kick()  # grants one (tasks[1]) ...
    tasks[1].cancel()  # ... which is cancelled before it could route: its slot comes back
    for t in tasks[2:]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.waiting == 0 and not adm.reserved
    assert all(t.inflight == 0 for t in adm.tenants.values())


async def _backlogged_shares(weights: dict[str, int], n_each: int, grants: int) -> dict[str, int]:
    adm, fleet, _ = make({"tenants": [{"name": k, "weight": w} for k, w in weights.items()]}, slots=1)
    held = await adm.admit("x", "m")
    fleet.used = 1
    order: list[str] = []
    tickets: list[Ticket] = []

    async def client(tenant: str) -> None:
        try:
            tickets.append(await adm.admit(tenant, "m"))
        except asyncio.CancelledError:
            return
        fleet.used += 1  # routed: takes the slot
        order.append(tenant)

    tasks = [asyncio.create_task(client(k)) for i in range(n_each) for k in weights]
    await asyncio.sleep(0)
    fleet.used -= 1
    held.release()  # first slot frees
    while len(order) < grants:
        await asyncio.sleep(0)
        fleet.used -= 1  # the request admitted last finishes
        tickets[-1].release()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {k: order[:grants].count(k) for k in weights}


async def test_weighted_fair_queueing_shares_capacity_by_weight() -> None:
    shares = await _backlogged_shares({"gold": 3, "free": 1}, n_each=60, grants=80)
    assert shares == {"gold": 60, "free": 20}
    shares = await _backlogged_shares({"a": 1, "b": 1, "c": 2}, n_each=40, grants=40)
    assert shares == {"a": 10, "b": 10, "c": 20}


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(1, 6), min_size=2, max_size=4), rounds=st.integers(1, 4))
def test_any_weights_are_respected(weights: list[int], rounds: int) -> None:
    """Backlogged tenants of any weights: over ``rounds`` x (sum of weights) grants, each tenant gets its
    weight x ``rounds``, give or take one (ties)."""
    named = {f"t{i}": w for i, w in enumerate(weights)}
    grants = sum(weights) * rounds
    shares = asyncio.run(_backlogged_shares(named, n_each=grants, grants=grants))
    for name, w in named.items():
        assert abs(shares[name] - w * rounds) <= 1, (shares, named)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1000)), min_size=1, max_size=80),
    max_waiting=st.integers(0, 8),
    conc=st.one_of(st.none(), st.integers(1, 3)),
)
def test_slots_are_conserved_under_any_interleaving(
    weights: list[int], ops: list[tuple[int, int]], max_waiting: int, conc: int | None
) -> None:
    """Random admits, releases, cancellations, capacity changes and clock steps: the counters always
    match the queues and tickets, no bucket goes negative, and once everything ends nothing is held."""

    async def run() -> None:
        spec = {
            "maxWaiting": max_waiting,
            "maxWaitMs": 60_000,
            "defaultTenant": {"requestsPerSecond": 50, "burstRequests": 5, "maxConcurrency": conc},
            "tenants": [{"name": f"t{i}", "weight": w} for i, w in enumerate(weights)],
        }
        spec["defaultTenant"] = {k: v for k, v in spec["defaultTenant"].items() if v is not None}  # type: ignore[union-attr]
        adm, fleet, clock = make(spec, slots=2)
        rng = random.Random(0)
        tickets: list[Ticket] = []
        tasks: list[asyncio.Task[Ticket]] = []
        names = [f"t{i}" for i in range(len(weights))] + ["guest"]
        for op, x in ops:
            if op == 0:
                tasks.append(asyncio.create_task(adm.admit(names[x % len(names)], "m", x)))
            elif op == 1 and tickets:
                tickets.pop(x % len(tickets)).release()
            elif op == 2 and tasks:
                tasks[x % len(tasks)].cancel()
            elif op == 3:
                fleet.slots = x % 4
                adm.kick()
            else:
                clock.t += x / 1000
            await asyncio.sleep(0)
            for t in [t for t in tasks if t.done()]:
                tasks.remove(t)
                if not t.cancelled() and t.exception() is None:
                    tickets.append(t.result())
                elif not t.cancelled():
                    assert isinstance(t.exception(), Rejected)
            invariants(adm)
            held = sum(t.inflight for t in adm.tenants.values())
            assert held == len(tickets) + sum(adm.reserved.values())
        rng.shuffle(tickets)
        for tk in tickets:
            tk.release()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Ticket):
                r.release()
        invariants(adm)
        assert adm.waiting == 0 and not adm.reserved
        assert all(t.inflight == 0 for t in adm.tenants.values())

    asyncio.run(run())
