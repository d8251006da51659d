"""Waiting on a condition with a timeout (never sleep-and-hope): the one helper the Ray tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
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
