"""Router-held per-replica queues: requests a policy has placed on a replica but not yet sent to it.

Most policies dispatch at once. A *holding* policy (:class:`HoldingPolicy`, e.g. ``dualmap_paper``, DualMap's
step 4-5) instead parks each routed request in the router-side queue of its chosen replica and releases it
to the engine when the replica passes the policy's dispatch gate; while it waits the policy may move it to
another queue (DualMap's hotspot migration). Running requests are never moved.

The queues live in the :class:`~corral.router.core.RouterCore` (:attr:`RouterCore.held`), not in the
policy: a policy swap keeps every held request (a non-holding policy releases them all on the next
``RouterCore.release``), so nothing routed is lost. The one mechanism serves every driver of a RouterCore:
the driver calls ``RouterCore.hold`` after ``route`` and dispatches what ``RouterCore.release`` returns
whenever capacity may have freed (a first token, a finish, an engine event, an arrival).

Order inside one queue: longest cached prefix on that replica first, then arrival (DualMap's code [C]).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .state import FleetState
from .types import Decision, RoutingRequest


@dataclass(slots=True, eq=False)
class Held:
    """One request held at the router for ``replica_id``."""

    rr: RoutingRequest
    decision: Decision
    replica_id: str
    since: float  # when the router received it (its wait counts toward its TTFT)
    cached_tokens: int = 0  # on ``replica_id`` when queued there (the queue's order key)
    uncached_tokens: int = 0  # prompt tokens ``replica_id`` still has to prefill
    backup: str | None = None  # the policy's other candidate (DualMap: the second ring's pick)
    seq: int = 0
    migrations: int = 0
    error: Exception | None = None  # set when released without a replica (its replica left, none other)

    @property
    def order(self) -> tuple[int, int]:
        return (-self.cached_tokens, self.seq)


@dataclass
class HeldQueues:
    """Every replica's router-side queue, with the per-replica facts a dispatch gate needs."""

    queues: dict[str, list[Held]] = field(default_factory=dict)
    last_prefill_done: dict[str, float] = field(default_factory=dict)  # replica -> last first token
    migrated: int = 0  # requests moved between queues, ever
    _seq: int = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def push(self, h: Held) -> None:
        """Queue ``h`` on ``h.replica_id`` in (longest cached prefix, arrival) order."""
        if not h.seq:
            self._seq += 1
            h.seq = self._seq
        q = self.queues.setdefault(h.replica_id, [])
        bisect.insort(q, h, key=lambda x: x.order)

    def remove(self, h: Held) -> None:
        self.queues[h.replica_id].remove(h)

    def pop_head(self, replica_id: str) -> Held:
        return self.queues[replica_id].pop(0)

    def queue(self, replica_id: str) -> list[Held]:
        return self.queues.get(replica_id, [])

    def queued_tokens(self, replica_id: str) -> int:
        """Uncached prompt tokens waiting in ``replica_id``'s router queue."""
        return sum(h.uncached_tokens for h in self.queue(replica_id))

    def oldest_wait(self, replica_id: str, now: float) -> float:
        q = self.queue(replica_id)
        return max((now - h.since for h in q), default=0.0)

    def move(self, h: Held, to: str, cached_tokens: int, uncached_tokens: int) -> None:
        """Migrate a queued request to ``to``'s queue (it keeps its arrival; its old replica becomes its
        backup, so a second move could only bring it back)."""
        self.remove(h)
        h.backup, h.replica_id = h.replica_id, to
        h.cached_tokens, h.uncached_tokens = cached_tokens, uncached_tokens
        h.migrations += 1
        self.migrated += 1
        self.push(h)

    def drain_all(self) -> Iterator[Held]:
        """Every held request (for a non-holding policy: release them as placed), oldest first."""
        out = sorted((h for q in self.queues.values() for h in q), key=lambda h: h.seq)
        self.queues.clear()
        yield from out


@runtime_checkable
class HoldingPolicy(Protocol):
    """A policy that queues routed requests at the router (see the module docstring)."""

    holds_requests: bool

    def enqueue(
        self, rr: RoutingRequest, decision: Decision, fleet: FleetState, queues: HeldQueues, now: float
    ) -> Held: ...

    def release(self, fleet: FleetState, queues: HeldQueues, now: float) -> list[Held]: ...
