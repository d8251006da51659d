"""Waiting on a condition with a timeout (never sleep-and-hope): ``wait_until`` for tests that block (Ray,
processes), ``async_wait_until`` for tests whose router or engines run on the test's own event loop."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``cond`` until it returns something truthy (returned); an exception counts as "not yet".
    On timeout, fail naming ``what`` and the last value or exception seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # not there yet (actor not created, replica starting, assertion, ...)
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


async def async_wait_until(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.01,
    tick: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """Poll ``cond`` (a value or an awaitable) on the event loop until it is truthy (returned); fail naming
    ``what`` after ``timeout`` seconds. Exceptions propagate. ``tick``, if given, is awaited between polls
    (e.g. to pump something the condition depends on)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if inspect.isawaitable(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        if tick is not None:
            await tick()
        await asyncio.sleep(interval)
