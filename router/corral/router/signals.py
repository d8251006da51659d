"""How Corral's long-running processes (router, router workers, engine endpoints) learn to stop.

One place for the SIGINT/SIGTERM handling every ``main`` needs: Kubernetes sends SIGTERM, a terminal sends
SIGINT, and both must end in an orderly shutdown (servers drained, engines closed) rather than a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for the running loop (where the platform supports handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
