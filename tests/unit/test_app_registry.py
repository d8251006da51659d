"""The engine/router registry (plain class; the Ray actor wraps it unchanged): TTLs, versions, leases."""

from __future__ import annotations

from corral.serve.registry import Registry


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_engines_register_refresh_expire_and_bump_versions() -> None:
    clock = _Clock()
    reg = Registry(clock)
    v1 = reg.register_engine("p", "e1", {"address": "h:1", "model": "m"}, ttl_s=3)
    v2 = reg.register_engine("p", "e2", {"address": "h:2", "model": "m"}, ttl_s=3)
    assert v2 == v1 + 1
    assert reg.register_engine("p", "e1", {"address": "h:1", "model": "m"}, ttl_s=3) == v2  # refresh only
    version, recs = reg.list_engines("p")
    assert [r["address"] for r in recs] == ["h:1", "h:2"] and recs[0]["replica_id"] == "e1"
    assert reg.list_engines("other") == (0, [])

    clock.t = 2.0
    reg.register_engine("p", "e2", {"address": "h:2", "model": "m"}, ttl_s=3)
    clock.t = 3.5  # e1 missed its heartbeats
    version2, recs = reg.list_engines("p")
    assert [r["replica_id"] for r in recs] == ["e2"] and version2 > version
    assert reg.deregister_engine("p", "e2") and not reg.deregister_engine("p", "e2")
    assert reg.list_engines("p")[1] == []


def test_routers_and_leases() -> None:
    clock = _Clock()
    reg = Registry(clock)
    reg.register_router("p", "r1", {"grpc": "h:9"}, ttl_s=2)
    assert reg.list_routers("p") == [{"grpc": "h:9", "router_id": "r1"}]
    clock.t = 5
    assert reg.list_routers("p") == []

    assert reg.acquire_lease("paging/p", "r1", ttl_s=2)
    assert not reg.acquire_lease("paging/p", "r2", ttl_s=2)
    assert reg.acquire_lease("paging/p", "r1", ttl_s=2)  # renew
    assert reg.lease_holder("paging/p") == "r1"
    clock.t = 8  # expired: another holder may take it
    assert reg.lease_holder("paging/p") is None
    assert reg.acquire_lease("paging/p", "r2", ttl_s=2)
    reg.release_lease("paging/p", "r1")  # not the holder: no effect
    assert reg.lease_holder("paging/p") == "r2"
    reg.release_lease("paging/p", "r2")
    assert reg.lease_holder("paging/p") is None


def test_demand_reports_sum_over_live_routers() -> None:
    clock = _Clock()
    reg = Registry(clock)
    reg.report_demand("p", "r1", {"a": 2.0, "b": 1.0}, ttl_s=3)
    reg.report_demand("p", "r2", {"a": 3.0}, ttl_s=1)
    assert reg.demand("p") == {"a": 5.0, "b": 1.0}
    assert reg.demand("p", exclude="r1") == {"a": 3.0}
    clock.t = 2  # r2's report expired
    assert reg.demand("p") == {"a": 2.0, "b": 1.0}
