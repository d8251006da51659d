"""The router core: fleet state, policy, admission bound, dispatch accounting and retry choice, without I/O.

One :class:`RouterCore` is what every Corral router runs, whatever drives it:

- the router service (:mod:`corral.router.server.core`) plugs in the wall clock and the engines' gRPC
  event streams and streams tokens itself;
- the fleet benchmark (:mod:`corral.serve.sim.fleet`) plugs in a virtual clock and the simulated engines'
  (delayed) events.

Both build it from :class:`~corral.router.settings.RouterSettings` (the one translation of the CRs), so
the benchmark measures the shipped router with the shipped RoutingPolicy defaults: same prefix-index mode,
same policy params, same queue bound, same retry exclusions.

Per request: :meth:`route` (candidates of the model, minus replicas excluded by earlier attempts and
replicas at their queue bound, then ``policy.choose``) -> :meth:`dispatch` -> :meth:`first_token` ->
:meth:`finish`. Engine events go through :meth:`apply`, which stamps load samples with the router's clock
on receipt, so sample ages never compare two machines' clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any

from .events import EngineEvent
from .holding import Held, HeldQueues, HoldingPolicy
from .policies import BUILTIN_POLICIES
from .policies._common import PolicyParams, waiting_load
from .policy import NoReplicaError, Policy, PolicyRegistry
from .settings import RouterSettings
from .state import FleetState, FleetView
from .types import Decision, RoutingRequest

DispatchHook = Callable[[str, RoutingRequest], None]
SAMPLE_MAX_AGE_S: float = PolicyParams.model_fields["sample_max_age_s"].default
"""How long an engine's load sample counts for the queue bound (seconds since the router received it): the
same trust the policies give it."""


class Saturated(NoReplicaError):
    """Every replica of the model holds ``max_queue_per_replica`` waiting requests (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RouterCore:
    """State + policy + admission + accounting of one router (see the module docstring)."""

    def __init__(
        self,
        settings: RouterSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        policies: PolicyRegistry = BUILTIN_POLICIES,
        on_dispatch: DispatchHook | None = None,
        fleet: FleetState | None = None,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.policies = policies
        t0 = time.monotonic()
        self.clock: Callable[[], float] = clock or (lambda: time.monotonic() - t0)
        self.on_dispatch = on_dispatch
        self.fleet = fleet or FleetState(index_mode=self.settings.index_mode, clock=self.clock)
        self.policy: Policy = policies.make(self.settings.strategy, **dict(self.settings.policy_params))
        self.held = HeldQueues()  # router-side queues of a holding policy (corral.router.holding)
        self._bind_queues()
        self.rejected = 0  # requests refused because every replica was at its queue bound

    @property
    def policy_name(self) -> str:
        return self.settings.strategy

    def now(self) -> float:
        return self.clock()

    # ---- live configuration -------------------------------------------------------------------------
    def configure(self, settings: RouterSettings) -> bool:
        """Apply new settings live; returns whether the policy was rebuilt. Fleet state, in-flight
        accounting and engine connections are kept (a changed index mode takes effect for new replicas
        and new events; existing indexes are kept as they are)."""
        old = self.settings
        rebuild = (settings.strategy, dict(settings.policy_params)) != (old.strategy, dict(old.policy_params))
        if rebuild:
            self.policy = self.policies.make(settings.strategy, **dict(settings.policy_params))
            self._bind_queues()
        self.fleet.index_mode = settings.index_mode
        self.settings = settings
        return rebuild

    def set_policy(self, strategy: str, params: dict[str, Any] | None = None) -> None:
        """Swap only the policy (``ValueError`` on an unknown name or bad param; nothing changes then)."""
        self.configure(replace(self.settings, strategy=strategy, policy_params=dict(params or {})))

    # ---- decisions ----------------------------------------------------------------------------------
    def route(
        self, rr: RoutingRequest, excluded: AbstractSet[str] = frozenset(), explain: bool = False
    ) -> Decision:
        """Choose a replica for ``rr`` among the model's healthy replicas that are neither in ``excluded``
        (earlier attempts) nor at their queue bound. Raises :class:`NoReplicaError` (none serves the model,
        or none is left after ``excluded``) or :class:`Saturated` (all at the bound; never for a retry, i.e.
        with ``excluded``: that request was admitted, so it goes to the best replica past the bound)."""
        fleet = self.fleet
        now = self.clock()
        members = fleet.candidates(rr.model)
        if not members:
            raise NoReplicaError(_no_replica_message(fleet, rr.model))
        for r in members:  # precise mode: forget sent blocks the engine never confirmed
            if r.unconfirmed:
                fleet.expire_unconfirmed(r, now)
        excl = frozenset(excluded)
        left = [r for r in members if r.replica_id not in excl] if excl else members
        if not left:
            raise NoReplicaError(
                f"no healthy replica left for model '{rr.model}' after trying {', '.join(sorted(excl))}"
            )
        bound = self.settings.max_queue_per_replica
        held = self.held
        full = frozenset(
            r.replica_id
            for r in left
            if waiting_load(r, now, SAMPLE_MAX_AGE_S) + len(held.queue(r.replica_id)) >= bound
        )  # requests held for a replica at the router (holding policies) count as sent to it
        if len(full) == len(left) and excl:
            full = frozenset()  # a retry was let in already: re-route it past the bound, never refuse it
        elif len(full) == len(left):
            self.rejected += 1
            raise Saturated(
                f"every replica of model '{rr.model}' has {bound} or more requests waiting "
                "(RoutingPolicy spec.load.maxQueueRequestsPerReplica); retry later",
                retry_after_s=max(0.1, self.settings.ttft_slo_s / 2),
            )
        hidden = excl | full
        view: Any = FleetView(fleet, hidden) if hidden else fleet
        return self.policy.choose(rr, view, now, explain)

    # ---- router-held queues (holding policies: corral.router.holding) -------------------------------
    def _bind_queues(self) -> None:
        # the isinstance of a runtime Protocol costs ~5 us: decided once per policy, not per request
        self._holds = isinstance(self.policy, HoldingPolicy)
        if self._holds:
            self.policy.queues = self.held  # type: ignore[attr-defined]

    @property
    def holds(self) -> bool:
        """Whether routed requests wait in the router's queues (:meth:`hold`, then :meth:`release`)."""
        return self._holds

    def hold(self, rr: RoutingRequest, decision: Decision) -> Held:
        """Queue a routed request at the router instead of dispatching it (holding policies only)."""
        if not isinstance(self.policy, HoldingPolicy):
            raise TypeError(f"policy '{self.policy_name}' dispatches at once; it holds no queues")
        return self.policy.enqueue(rr, decision, self.fleet, self.held, self.clock())

    def release(self) -> list[Held]:
        """Held requests to dispatch now (the caller sends each to ``held.decision.replica_id`` and calls
        :meth:`dispatch`); call it whenever capacity may have freed. After a swap to a non-holding policy
        every held request is released as placed."""
        if not self.held.queues:
            return []
        out = self._reroute_orphans()
        if not isinstance(self.policy, HoldingPolicy):
            return out + list(self.held.drain_all())
        return out + self.policy.release(self.fleet, self.held, self.clock())

    def _reroute_orphans(self) -> list[Held]:
        """Requests held for a replica that left or turned unhealthy are routed again (their wait so far
        kept); one with no replica left is returned with ``error`` set, for its driver to fail."""
        out: list[Held] = []
        fleet = self.fleet
        for rid, q in list(self.held.queues.items()):
            r = fleet.replicas.get(rid)
            if not q or (r is not None and r.healthy):
                continue
            for h in list(q):
                q.remove(h)
                try:
                    d = self.route(h.rr, excluded=frozenset({rid}))
                except NoReplicaError as e:
                    h.error = e
                    out.append(h)
                    continue
                if isinstance(self.policy, HoldingPolicy):
                    self.policy.enqueue(h.rr, d, fleet, self.held, self.clock()).since = h.since
                else:
                    h.decision, h.replica_id = d, d.replica_id
                    out.append(h)
        return out

    # ---- accounting ---------------------------------------------------------------------------------
    def dispatch(self, replica_id: str, rr: RoutingRequest, decision: Decision | None = None) -> None:
        self.fleet.on_dispatch(replica_id, rr, decision.cached_blocks if decision is not None else None)
        if self.on_dispatch is not None:
            self.on_dispatch(replica_id, rr)

    def first_token(self, replica_id: str, request_id: str) -> None:
        self.fleet.on_first_token(replica_id, request_id)
        self.held.last_prefill_done[replica_id] = self.clock()

    def finish(self, replica_id: str, request_id: str) -> None:
        self.fleet.on_finish(replica_id, request_id)

    def apply(self, ev: EngineEvent) -> None:
        """An engine event, as received now (load samples are stamped with this router's clock)."""
        self.fleet.apply(ev)


def _no_replica_message(fleet: FleetState, model: str) -> str:
    serving = [r for r in fleet.replicas.values() if r.model == model]
    if serving:
        return f"no healthy replica serves model '{model}' ({len(serving)} replica(s) known, all unhealthy)"
    served = sorted({r.model for r in fleet.replicas.values()})
    if not served:
        return f"no healthy replica serves model '{model}' (no replica is connected)"
    return f"no healthy replica serves model '{model}'; the connected replicas serve: {', '.join(served)}"
