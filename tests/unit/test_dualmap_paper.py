"""``dualmap_paper``: DualMap with router-side queues (corral.router.holding) and hotspot migration, on the
router core both the router service and the fleet simulator run."""

from __future__ import annotations

from dataclasses import replace

import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.admission import free_slots
from corral.router.core import RouterCore, Saturated
from corral.router.holding import Held
from corral.router.policies.dualmap_paper import DualMapPaper, DualMapPaperParams
from corral.router.settings import RouterSettings
from corral.router.types import Decision, RoutingRequest
from corral.serve.sim import workloads as W
from corral.serve.sim.fleet import FleetConfig, fleet_settings, parse_replicas, run_fleet

BS = 16


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_core(n: int, **params: object) -> tuple[RouterCore, Clock]:
    clock = Clock()
    s = RouterSettings(strategy="dualmap_paper", policy_params=params, index_mode="approximate")
    c = RouterCore(s, clock=clock)
    for k in range(n):
        c.fleet.add_replica(f"r{k}", "m", "H100", BUILTIN_PROFILES["H100"], block_size=BS)
    return c, clock


def rr(rid: str, blocks: list[int], arrival: float = 0.0) -> RoutingRequest:
    return RoutingRequest(rid, "m", blocks, len(blocks) * BS, 16, None, arrival=arrival)


def test_parameters_are_the_papers() -> None:
    p = DualMapPaperParams()
    # paper §3.2 / authors' code, see shared/docs/papers.md "Parameters"
    assert (p.ttft_slo_s, p.switch_fraction, p.key_block_tokens, p.window, p.min_samples) == (
        5.0,
        1.0,
        512,
        200,
        20,
    )
    assert (p.expand_factor, p.merge_factor, p.vnodes) == (2.0, 1.0, 160)
    assert (p.pending_req_threshold, p.busy_prefill_interval_s, p.rebalance_fraction, p.max_wait_s) == (
        1,
        2.0,
        1.0,
        3.0,
    )
    # the benchmark hands it the workload's SLO, like dualmap
    assert dict(fleet_settings("dualmap_paper", 2.0).policy_params) == {"ttft_slo_s": 2.0}
    c, _ = make_core(1)
    assert c.holds and isinstance(c.policy, DualMapPaper) and c.policy.queues is c.held


def test_queue_drains_longest_cached_prefix_first_then_in_arrival_order() -> None:
    c, clock = make_core(1)
    r0 = c.fleet.replicas["r0"]
    r0.index.insert([1, 2, 3, 4])  # blocks already cached on r0
    first = rr("first", [90, 91])
    c.hold(first, c.route(first))
    out = c.release()
    assert [h.rr.request_id for h in out] == ["first"]  # an idle replica takes the head at once
    c.dispatch("r0", first, out[0].decision)
    for name, blocks in (
        ("cold1", [50, 51]),
        ("warm2", [1, 2, 70]),
        ("warm4", [1, 2, 3, 4, 80]),
        ("cold2", [60]),
    ):
        x = rr(name, blocks, clock.t)
        c.hold(x, c.route(x))
        clock.t += 0.01
    assert c.release() == []  # one dispatched request still waits for its first token (threshold 1)
    order = []
    prev = "first"
    while len(c.held):
        clock.t += 0.1
        c.first_token("r0", prev)
        out = c.release()
        assert len(out) == 1
        h = out[0]
        c.dispatch(h.decision.replica_id, h.rr, h.decision)
        order.append(prev := h.rr.request_id)
    assert order == ["warm4", "warm2", "cold1", "cold2"]


def test_a_busy_replica_whose_last_prefill_is_old_is_not_fed() -> None:
    c, clock = make_core(1)
    a = rr("a", [1])
    c.hold(a, c.route(a))
    (h,) = c.release()
    c.dispatch("r0", a, h.decision)
    c.first_token("r0", "a")  # a decodes on
    clock.t = 2.5  # > busy_prefill_interval_s since the last prefill completed
    b = rr("b", [2], 2.5)
    c.hold(b, c.route(b))
    assert c.release() == []
    c.finish("r0", "a")  # idle again
    assert [x.rr.request_id for x in c.release()] == ["b"]


def _queue(c: RouterCore, src: str, dst: str, n: int, tokens: int) -> list[Held]:
    out = []
    for k in range(n):
        x = RoutingRequest(f"q{k}", "m", [1000 + k], tokens, 16, None, arrival=0.0)
        h = Held(x, Decision(src, "dualmap_paper", "test"), src, 0.0, 0, tokens, backup=dst)
        c.held.push(h)
        out.append(h)
    return out


def test_migration_moves_queued_requests_off_a_hotspot_to_their_own_backup() -> None:
    # 1 ms per token, 5 s SLO: 4 x 2000 queued tokens on r0 = 8 s pending -> overloaded
    c, _ = make_core(3, tpct_s=0.001)
    busy = rr("busy", [7])
    c.dispatch("r0", busy, Decision("r0", "x", "x"))  # r0 has a request waiting: its gate is closed
    hs = _queue(c, "r0", "r1", 4, 2000)
    out = c.release()
    # benefit B = TTFT on r0 (queue ahead included) - TTFT on r1: 6 s, 4 s, 2 s, 0 s by position; the two
    # largest move (descending B), then r0's 2 x 2000 tokens = 4 s meet the SLO and migration stops
    assert c.held.migrated == 2
    assert [h.replica_id for h in hs] == ["r0", "r0", "r1", "r1"]
    assert all(h.backup == "r0" for h in hs[2:])  # only within the request's own pair
    assert c.held.queue("r2") == []
    assert [h.rr.request_id for h in out] == ["q2"]  # r1 is idle: its queue head goes at once
    assert len(c.held) == 3  # nothing lost


def test_no_migration_to_an_overloaded_backup() -> None:
    c, _ = make_core(2, tpct_s=0.001)
    c.dispatch("r0", rr("busy0", [7]), Decision("r0", "x", "x"))
    c.dispatch("r1", rr("busy1", [8] * 400), Decision("r1", "x", "x"))  # 6400 tokens pending: > 5 s
    _queue(c, "r0", "r1", 4, 2000)
    assert c.release() == []
    assert c.held.migrated == 0 and len(c.held.queue("r0")) == 4


def test_a_policy_swap_releases_every_held_request() -> None:
    c, _ = make_core(1)
    c.dispatch("r0", rr("busy", [7]), Decision("r0", "x", "x"))
    for k in range(3):
        x = rr(f"h{k}", [k + 20])
        c.hold(x, c.route(x))
    assert c.release() == []
    c.set_policy("least_loaded")
    assert not c.holds
    assert [h.rr.request_id for h in c.release()] == ["h0", "h1", "h2"]


def test_fleet_sim_runs_dualmap_paper_with_queues_and_migration() -> None:
    w = W.bursty(800, seed=1)
    cfg = FleetConfig(replicas=parse_replicas("H100:2,A100-80GB:2"))
    a = run_fleet(w, "dualmap_paper", scale=160 / w.base_rate, config=cfg)
    b = run_fleet(w, "dualmap_paper", scale=160 / w.base_rate, config=cfg)
    assert a.ttft.tolist() == b.ttft.tolist()  # deterministic
    assert a.completed == a.measured and a.rejected == 0  # every held request was dispatched and served
    assert a.migrated > 0  # hotspots formed and queued requests moved
    low = run_fleet(w, "dualmap_paper", scale=10 / w.base_rate, config=cfg)
    assert low.completed == low.measured and low.migrated == 0
    # the router-side wait counts in the TTFT: at the overload rate the held requests' TTFT exceeds what
    # any engine-side wait alone gave at the low rate
    assert a.pct(90) > low.pct(90)


def test_requests_held_for_a_replica_that_leaves_are_routed_again_or_failed() -> None:
    c, clock = make_core(2)
    for rid in ("r0", "r1"):
        c.dispatch(rid, rr(f"busy-{rid}", [7]), Decision(rid, "x", "x"))  # both gates closed
    xs = [rr(f"h{k}", [100 + k]) for k in range(6)]
    for x in xs:
        c.hold(x, c.route(x))
    assert c.release() == [] and len(c.held) == 6
    on_r0 = {h.rr.request_id for h in c.held.queue("r0")}
    assert on_r0  # six keys spread over both replicas
    clock.t = 1.0
    c.fleet.set_healthy("r0", False)
    assert c.release() == []  # r1's gate is still closed: re-queued there, nothing lost
    assert {h.rr.request_id for h in c.held.queue("r1")} == {x.request_id for x in xs}
    assert all(h.since == 0.0 for h in c.held.queue("r1"))  # their wait so far is kept
    c.fleet.set_healthy("r1", False)
    c.fleet.set_healthy("r0", False)
    out = c.release()
    assert len(out) == 6 and all(h.error is not None for h in out) and len(c.held) == 0
    assert "no healthy replica" in str(out[0].error)


def test_held_requests_count_toward_the_queue_bound() -> None:
    c, _ = make_core(1)
    c.configure(replace(c.settings, max_queue_per_replica=3))
    c.dispatch("r0", rr("busy", [7]), Decision("r0", "x", "x"))  # 1 waiting on the engine, gate closed
    assert free_slots(c, "m") == 2
    for k in range(2):
        x = rr(f"h{k}", [20 + k])
        c.hold(x, c.route(x))
    assert free_slots(c, "m") == 0
    with pytest.raises(Saturated, match="maxQueueRequestsPerReplica"):
        c.route(rr("h2", [30]))
