"""Admission control: a request that is refused for the fleet's capacity (queue full, estimated wait, a
wait that timed out) or that leaves while waiting does not spend its tenant's rate (a rate limit bounds
what is let in; a tenant retrying through an overload kept being charged and met 'rate' 429s after)."""

from __future__ import annotations

import asyncio

import pytest
from corral.api.admission import AdmissionSpec
from corral.router.admission import Admission, Rejected


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(spec: dict[str, object], slots: list[float]) -> Admission:
    return Admission(AdmissionSpec.model_validate(spec), lambda model: slots[0], Clock())


LIMITS = {"requestsPerSecond": 1, "burstRequests": 1, "tokensPerSecond": 10, "burstTokens": 100}


async def test_queue_full_refusal_leaves_the_rate_untouched() -> None:
    slots = [0.0]
    adm = make({"maxWaiting": 0, "defaultTenant": LIMITS}, slots)
    with pytest.raises(Rejected) as e:
        await adm.admit("a", "m", 100)
    assert e.value.reason == "queue_full"
    slots[0] = 1.0  # capacity frees within the same instant: the tenant's budget is all there
    (await adm.admit("a", "m", 100)).release()


async def test_a_timed_out_or_cancelled_waiter_leaves_the_rate_untouched() -> None:
    slots = [0.0]
    adm = make({"maxWaitMs": 30, "defaultTenant": LIMITS}, slots)
    with pytest.raises(Rejected) as e:
        await asyncio.wait_for(adm.admit("a", "m", 100), 5)
    assert e.value.reason == "timeout"
    waiter = asyncio.create_task(adm.admit("a", "m", 100))
    await asyncio.sleep(0)
    assert adm.waiting == 1
    waiter.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots[0] = 1.0
    (await adm.admit("a", "m", 100)).release()
    t = adm.tenant("a")
    assert t.requests is not None and t.tokens is not None
    assert t.requests.tokens == 0 and t.tokens.tokens == 0  # the one admitted request, charged once
