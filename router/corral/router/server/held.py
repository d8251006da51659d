"""The router service's driver of the router core's held queues (:mod:`corral.router.holding`).

With a holding policy (``dualmap_paper``) a routed request does not go to its engine at once: the service
calls :meth:`HeldDispatcher.wait`, which queues it with ``RouterCore.hold`` and resolves when
``RouterCore.release`` hands it out. The dispatcher calls ``RouterCore.dispatch`` itself at that moment,
so the next release already counts the request on its replica (the dispatch gate reads those counts);
the caller then streams from ``decision.replica_id`` without dispatching again. Releases are tried when
capacity may have freed (:meth:`pump`: a first token, a finish) and on a short poll while anything is
held (engine load samples move the gate too). A request cancelled while held leaves the queue; one
cancelled after its release is finished again, so no count leaks. The fleet simulator drives the same
``hold`` / ``release`` calls from its event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..types import Decision, RoutingRequest
from .errors import Unavailable

POLL_S = 0.02
"""How often held queues are re-checked while requests are held (besides first tokens and finishes)."""


class HeldDispatcher:
    """Waits for the router core to release held requests (see the module docstring)."""

    def __init__(self, core: Any, poll_s: float = POLL_S) -> None:
        self.core = core
        self.poll_s = poll_s
        self.waiters: dict[str, asyncio.Future[Decision]] = {}
        self._poll: asyncio.TimerHandle | None = None

    async def wait(self, rr: RoutingRequest, decision: Decision) -> Decision:
        """Hold ``rr`` (routed to ``decision``) until released; returns the decision it is dispatched
        with (its replica may differ: a hotspot migration). The request is already dispatched then."""
        core = self.core
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self.waiters[rr.request_id] = fut
        core.hold(rr, decision)
        self.pump()
        try:
            if not fut.done():
                self._ensure_poll(loop)
            return await fut
        except BaseException:
            self.waiters.pop(rr.request_id, None)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                core.finish(fut.result().replica_id, rr.request_id)  # released, then cancelled
            else:
                _drop(core, rr.request_id)
            raise

    def pump(self) -> None:
        """Dispatch what the router core releases now."""
        core = self.core
        if not len(core.held):
            return
        for h in core.release():
            if h.error is not None:  # its replica left and no other serves the model
                fut = self.waiters.pop(h.rr.request_id, None)
                if fut is not None and not fut.done():
                    why = str(h.error) or f"no healthy replica serves model '{h.rr.model}'"
                    fut.set_exception(Unavailable(why))
                continue
            rid = h.decision.replica_id
            core.dispatch(rid, h.rr, h.decision)
            fut = self.waiters.pop(h.rr.request_id, None)
            if fut is None or fut.done():
                core.finish(rid, h.rr.request_id)  # nobody waits for it any more
            else:
                fut.set_result(h.decision)

    def _ensure_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poll is None:
            self._poll = loop.call_later(self.poll_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._poll = None
        self.pump()
        if len(self.core.held):
            self._ensure_poll(loop)


def _drop(core: Any, request_id: str) -> None:
    for q in core.held.queues.values():
        for h in q:
            if h.rr.request_id == request_id:
                q.remove(h)
                return
