"""The router core shared by the service and the fleet benchmark: queue bound, retry exclusions that keep
the hash rings, precise-index confirmation of just-sent blocks, the explicit policy registry, and the
benchmark running the shipped RoutingPolicy defaults."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest
from corral.api.profiles import BUILTIN_PROFILES
from corral.api.routingpolicy import RoutingPolicySpec
from corral.router.core import RouterCore, Saturated
from corral.router.events import BlockStored
from corral.router.policies import BUILTIN_POLICIES
from corral.router.policies._common import RingCache
from corral.router.policy import NoReplicaError, PolicyRegistry
from corral.router.settings import router_settings
from corral.serve.sim.fleet import fleet_settings
from router_testkit import prompt, req


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def core(
    n: int, *, strategy: str = "corral", mode: str = "precise", bound: int = 32
) -> tuple[RouterCore, Clock]:
    clock = Clock()
    spec = RoutingPolicySpec.model_validate(
        {
            "poolRef": "p",
            "strategy": strategy,
            "prefixIndex": mode,
            "load": {"maxQueueRequestsPerReplica": bound},
        }
    )
    c = RouterCore(router_settings(spec), clock=clock)
    for i in range(n):
        c.fleet.add_replica(f"r{i:03d}", "m", "H100", BUILTIN_PROFILES["H100"])
    return c, clock


@pytest.mark.parametrize("strategy", ["corral", "dualmap", "chbl"])
def test_retry_exclusions_never_pick_excluded_and_keep_the_rings(strategy: str) -> None:
    c, _ = core(128, strategy=strategy)
    rr = req("a", prompt(1, 2048))
    first = c.route(rr).replica_id
    caches = [v for v in vars(c.policy).values() if isinstance(v, RingCache)]
    assert caches, "ring policies keep their rings in a RingCache"
    before = {m: id(entry[3]) for cache in caches for m, entry in cache._cache.items()}
    excluded = {first}
    t0 = time.perf_counter()
    for _ in range(5):
        d = c.route(rr, excluded)
        assert d.replica_id not in excluded
        excluded.add(d.replica_id)
    elapsed = time.perf_counter() - t0
    after = {m: id(entry[3]) for cache in caches for m, entry in cache._cache.items()}
    assert after == before, "a retry must not rebuild the hash rings"
    assert elapsed < 0.5  # generous bound; a ring rebuild per retry at 128 replicas took ~57 ms each


def test_all_replicas_excluded_is_no_replica_error_naming_them() -> None:
    c, _ = core(2)
    rr = req("a", prompt(1, 64))
    with pytest.raises(NoReplicaError, match="after trying r000, r001"):
        c.route(rr, {"r000", "r001"})


def test_queue_bound_skips_full_replicas_and_saturates() -> None:
    c, _ = core(2, bound=2)
    for k in range(2):  # fill r000 with two waiting requests
        rr = req(f"w{k}", prompt(10 + k, 64))
        c.dispatch("r000", rr)
    for k in range(3):
        d = c.route(req(f"n{k}", prompt(20 + k, 64)))
        assert d.replica_id == "r001"  # r000 is at its bound
        c.dispatch(d.replica_id, req(f"n{k}", prompt(20 + k, 64)))
        if k == 1:
            break
    with pytest.raises(Saturated, match="maxQueueRequestsPerReplica") as e:
        c.route(req("x", prompt(99, 64)))
    assert e.value.retry_after_s > 0 and c.rejected == 1
    c.first_token("r000", "w0")  # one starts decoding: room again
    assert c.route(req("y", prompt(98, 64))).replica_id == "r000"


def test_a_retry_is_never_refused_for_the_queue_bound() -> None:
    """A request that failed on one replica before its first token was admitted already: re-routed past
    the bound (to the best replica left), not answered 429 (found by the engine-kill-under-admission test)."""
    c, _ = core(3, bound=1)
    for k, rid in enumerate(("r000", "r001", "r002")):
        c.dispatch(rid, req(f"w-{rid}", prompt(50 + k, 64)))
    with pytest.raises(Saturated):
        c.route(req("new", prompt(1, 64)))
    assert c.route(req("retry", prompt(2, 64)), {"r000"}).replica_id in ("r001", "r002")
    with pytest.raises(NoReplicaError, match="after trying"):
        c.route(req("retry", prompt(2, 64)), {"r000", "r001", "r002"})


def test_precise_index_counts_sent_blocks_until_confirmed_or_expired() -> None:
    c, clock = core(2)
    rr = req("a", prompt(1, 320))  # 20 blocks
    c.dispatch("r000", rr)
    r = c.fleet.replicas["r000"]
    assert r.index.match(rr.block_hashes) == 20  # before any engine event
    c.apply(BlockStored("r000", rr.block_hashes[:10]))  # the engine confirms half
    clock.t = c.fleet.confirm_grace_s + 1
    c.route(req("b", prompt(2, 32)))  # routing expires what is overdue before it matches
    assert r.index.match(rr.block_hashes) == 10
    assert not r.unconfirmed


def test_policy_registry_is_explicit_and_import_has_no_cycle() -> None:
    assert BUILTIN_POLICIES.names()[:1] == ["approx_prefix"] and "corral" in BUILTIN_POLICIES
    reg = PolicyRegistry()
    with pytest.raises(ValueError, match="unknown routing policy 'corral'; known: "):
        reg.make("corral")
    cls = type(BUILTIN_POLICIES.make("round_robin"))
    reg.add(cls)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(cls)
    code = "import sys, corral.router.policy; print('corral.router.policies' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "corral.router.policy must not import the built-in policies"


def test_benchmark_runs_the_shipped_routing_policy_defaults() -> None:
    shipped = router_settings(RoutingPolicySpec.model_validate({"poolRef": "x", "ttftSloMs": 5000}))
    bench = fleet_settings("corral", 5.0)
    assert bench == shipped
    assert bench.index_mode == "precise" and bench.max_queue_per_replica == 128
    assert fleet_settings("approx_prefix", 5.0).index_mode == "approximate"
    assert fleet_settings("corral@approximate", 5.0) == replace(shipped, index_mode="approximate")
    assert dict(fleet_settings("corral", 5.0, {"hotspot_c": None}).policy_params)["hotspot_c"] is None
