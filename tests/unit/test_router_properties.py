"""Hypothesis properties of every policy: only healthy replicas of the model, adapter salt isolation,
determinism for a fixed state and seed, and bounded remapping when a replica joins or leaves."""

from __future__ import annotations

import numpy as np
from corral.api.profiles import BUILTIN_PROFILES
from corral.router.policies import make_policy, policy_names
from corral.router.state import FleetState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_testkit import fleet, prompt, req

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GPUS = ["H100", "A100-80GB", "L4"]


def mixed_fleet(n: int, seed: int, unhealthy: list[bool]) -> FleetState:
    rng = np.random.default_rng(seed)
    f = FleetState()
    for i in range(n):
        gpu = GPUS[int(rng.integers(0, 3))]
        model = "m" if rng.random() < 0.7 else "other"
        f.add_replica(f"r{i:03d}", model, gpu, BUILTIN_PROFILES[gpu])
        if unhealthy[i % len(unhealthy)]:
            f.set_healthy(f"r{i:03d}", False)
    return f


@SETTINGS
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    unhealthy=st.lists(st.booleans(), min_size=1, max_size=5),
    name=st.sampled_from(sorted(policy_names())),
)
def test_never_picks_unhealthy_or_wrong_model(n: int, seed: int, unhealthy: list[bool], name: str) -> None:
    f = mixed_fleet(n, seed, unhealthy)
    ok = {r.replica_id for r in f.candidates("m")}
    if not ok:
        return
    p = make_policy(name, seed=seed)
    rng = np.random.default_rng(seed)
    for k in range(30):
        q = req(
            f"q{k}", prompt(int(rng.integers(0, 8)), int(rng.integers(1, 3000))), adapter=["a", None][k % 2]
        )
        d = p.choose(q, f, float(k), explain=k % 5 == 0)
        assert d.replica_id in ok
        f.on_dispatch(d.replica_id, q, d.cached_blocks)
        if k % 3 == 0:
            victim = sorted(ok)[int(rng.integers(0, len(ok)))]
            f.set_healthy(victim, False)
            ok.discard(victim)
            if not ok:
                return


@SETTINGS
@given(
    n=st.integers(1, 24),
    seed=st.integers(0, 10_000),
    a=st.sampled_from(["x", "y", None]),
    b=st.sampled_from(["x", "y", None]),
    name=st.sampled_from(sorted(policy_names())),
)
def test_adapter_salt_isolation(n: int, seed: int, a: str | None, b: str | None, name: str) -> None:
    if a == b:
        return
    f = fleet(n)
    toks = prompt(seed, 1000)
    for rid in f.replicas:
        f.on_dispatch(rid, req(f"w{rid}", toks, adapter=a))
    d = make_policy(name, seed=seed).choose(req("q", toks, adapter=b), f, 0.0, explain=True)
    assert d.cached_blocks == 0
    assert d.candidates is not None and all(c.cached_blocks == 0 for c in d.candidates)
    same = make_policy(name, seed=seed).choose(req("q", toks, adapter=a), f, 0.0)
    assert same.cached_blocks == 62  # 1000 // 16 full blocks


def _run(name: str, seed: int, n: int) -> list[tuple[str, str, int]]:
    f = fleet(n)
    p = make_policy(name, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(40):
        q = req(
            f"q{k}", prompt(int(rng.integers(0, 6)), int(rng.integers(1, 2000))), adapter=["a", None][k % 2]
        )
        d = p.choose(q, f, k * 0.01)
        out.append((d.replica_id, d.reason, d.cached_blocks))
        f.on_dispatch(d.replica_id, q, d.cached_blocks)
        if k % 4 == 0:
            f.on_first_token(d.replica_id, q.request_id)
    return out


@SETTINGS
@given(n=st.integers(1, 24), seed=st.integers(0, 10_000), name=st.sampled_from(sorted(policy_names())))
def test_deterministic_for_fixed_state_and_seed(n: int, seed: int, name: str) -> None:
    assert _run(name, seed, n) == _run(name, seed, n)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(4, 40),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["chbl", "dualmap", "corral"]),
    join=st.booleans(),
)
def test_join_or_leave_moves_a_bounded_fraction_of_prefixes(n: int, seed: int, name: str, join: bool) -> None:
    f = fleet(n)
    p = make_policy(name)
    reqs = [req(f"q{k}", prompt(seed * 1000 + k, 600)) for k in range(400)]
    before = [p.choose(q, f, 0.0).replica_id for q in reqs]
    if join:
        f.add_replica("new", "m", "H100", BUILTIN_PROFILES["H100"])
        n_after = n + 1
    else:
        f.remove_replica(f"r{seed % n:03d}")
        n_after = n
    after = [p.choose(q, f, 0.0).replica_id for q in reqs]
    moved = sum(x != y for x, y in zip(before, after, strict=True)) / len(reqs)
    assert moved <= 2 / n_after + 0.06, (name, n, join, moved)
