"""Admission control in a real router (RoutingPolicy spec.admission) over real sockets: a request waits
for a replica queue slot and goes on when one frees, a client that disconnects while waiting gives its
place back, per-tenant rate limits answer 429 + Retry-After (HTTP) / RESOURCE_EXHAUSTED (gRPC) naming the
field, a request larger than the token bucket is a 400, limits change live, and no slot is left held."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from corral.api.routingpolicy import RoutingPolicySpec
from corral.router.server import RouterConfig, RouterServer
from corral.router.settings import router_settings
from corral.router.types import RoutingRequest
from corral.serve.endpoint import EchoEngine, EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "echo"
KEYS = {"key-gold": "gold", "key-free": "free"}
POLICY: dict[str, Any] = {
    "poolRef": "p",
    "strategy": "round_robin",
    "load": {"maxQueueRequestsPerReplica": 1},
    "admission": {
        "maxWaiting": 4,
        "maxWaitMs": 60_000,
        "tenants": [
            {"name": "gold", "weight": 3},
            {"name": "free", "requestsPerSecond": 0.01, "burstRequests": 1, "tokensPerSecond": 1000},
        ],
    },
}


@pytest.fixture
async def router() -> AsyncIterator[RouterServer]:
    ep = await EngineEndpoint.start(
        EchoEngine(replica_id="e0", model=MODEL, profile="H100", gpu_class="H100"), "127.0.0.1", 0
    )
    r = RouterServer(
        [ep.address], RouterConfig.from_settings(router_settings(RoutingPolicySpec.model_validate(POLICY)))
    )
    r.set_api_keys(dict(KEYS))
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(1, timeout=10)
    try:
        yield r
    finally:
        await r.stop(0)
        await ep.stop(None)


def held(r: RouterServer) -> dict[str, tuple[int, int]]:
    """tenant -> (waiting, in flight) in the router's admission control."""
    return {t: (w, n) for t, w, n, _ in r.router.admission.stats()}


async def post(r: RouterServer, key: str, **body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = {"model": MODEL, "prompt": "hello", "max_tokens": 2, **body}
    async with (
        aiohttp.ClientSession() as s,
        s.post(r.http_url + "/v1/completions", json=req, headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status, json.loads(await resp.text()), dict(resp.headers)


def fill(r: RouterServer) -> RoutingRequest:
    """One request waiting (no first token) on the only replica: the fleet is at its queue bound."""
    h = RoutingRequest("held", MODEL, [], 8, 2)
    r.router.core.dispatch("e0", h)
    return h


async def test_waits_for_a_slot_and_goes_on_when_one_frees(router: RouterServer) -> None:
    h = fill(router)
    task = asyncio.create_task(post(router, "key-gold"))
    await wait_until(lambda: held(router).get("gold") == (1, 0), timeout=10, what="gold waiting")
    router.router.core.finish("e0", h.request_id)
    status, out, _ = await asyncio.wait_for(task, 30)
    assert status == 200 and out["choices"][0]["finish_reason"]
    await wait_until(lambda: held(router)["gold"] == (0, 0), timeout=10, what="gold slot released")


async def test_a_client_that_leaves_while_waiting_gives_its_place_back(router: RouterServer) -> None:
    h = fill(router)
    tasks = [asyncio.create_task(post(router, "key-gold")) for _ in range(3)]
    await wait_until(lambda: held(router).get("gold") == (3, 0), timeout=10, what="3 waiting")
    for t in tasks:
        t.cancel()  # the HTTP client disconnects
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_until(lambda: held(router)["gold"] == (0, 0), timeout=10, what="waiters removed")
    # and gRPC: a cancelled call while waiting
    async with grpc.aio.insecure_channel(router.grpc_address) as ch:
        stub = rpb_grpc.RouterStub(ch)
        call = stub.Generate(
            rpb.CompletionRequest(model=MODEL, prompt="hi", max_tokens=2),
            metadata=(("authorization", "Bearer key-gold"),),
        )
        await wait_until(lambda: held(router)["gold"] == (1, 0), timeout=10, what="gRPC waiter")
        call.cancel()
    await wait_until(lambda: held(router)["gold"] == (0, 0), timeout=10, what="gRPC waiter removed")
    router.router.core.finish("e0", h.request_id)
    assert (await post(router, "key-gold"))[0] == 200


async def test_queue_full_is_429_with_retry_after(router: RouterServer) -> None:
    h = fill(router)
    tasks = [asyncio.create_task(post(router, "key-gold")) for _ in range(4)]
    await wait_until(lambda: held(router).get("gold") == (4, 0), timeout=10, what="queue full")
    status, out, headers = await post(router, "key-gold")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert (
        "maxWaiting = 4" in out["error"]["message"]
        and "maxQueueRequestsPerReplica" in out["error"]["message"]
    )
    router.router.core.finish("e0", h.request_id)
    assert [s for s, _, _ in await asyncio.wait_for(asyncio.gather(*tasks), 30)] == [200] * 4
    await wait_until(lambda: held(router)["gold"] == (0, 0), timeout=10, what="all released")


async def test_tenant_rate_limit_is_429_naming_the_field_http_and_grpc(router: RouterServer) -> None:
    assert (await post(router, "key-free"))[0] == 200  # the burst of 1
    status, out, headers = await post(router, "key-free")
    assert status == 429 and int(headers["Retry-After"]) >= 60  # 1 request per 100 s
    assert "spec.admission.tenants[1].requestsPerSecond" in out["error"]["message"]
    assert (await post(router, "key-gold"))[0] == 200  # other tenants unaffected
    async with grpc.aio.insecure_channel(router.grpc_address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpb_grpc.RouterStub(ch).Generate(
                rpb.CompletionRequest(model=MODEL, prompt="hi", max_tokens=2),
                metadata=(("authorization", "Bearer key-free"),),
            )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requestsPerSecond" in str(
        e.value.details()
    )
    assert held(router)["free"] == (0, 0)
    m = router.router.metrics.render().decode()
    assert 'corral_admission_rejected_total{reason="rate",tenant="free"} 2.0' in m
    assert "key-free" not in m and "key-gold" not in m


async def test_a_request_over_the_token_bucket_is_400_and_limits_change_live(router: RouterServer) -> None:
    status, out, _ = await post(router, "key-gold", max_tokens=5000)
    assert status == 200
    spec = RoutingPolicySpec.model_validate(
        {**POLICY, "admission": {"defaultTenant": {"tokensPerSecond": 100, "burstTokens": 200}}}
    )
    router.configure(router_settings(spec))  # gold is not listed any more: the default tenant's limits
    status, out, _ = await post(router, "key-gold", max_tokens=5000)
    assert status == 400 and out["error"]["param"] == "max_tokens"
    assert "defaultTenant.burstTokens = 200" in out["error"]["message"]
    assert held(router)["gold"] == (0, 0)


@pytest.fixture
async def sim_router() -> AsyncIterator[tuple[RouterServer, EngineEndpoint]]:
    """A router over one wall-clock sim replica (streams take a while: room to leave or fail mid-way)."""
    sim = pytest.importorskip("corral.serve.endpoint.sim")
    ep = await EngineEndpoint.start(sim.SimEndpointEngine.create("H100", "s0", MODEL), "127.0.0.1", 0)
    r = RouterServer(
        [ep.address], RouterConfig.from_settings(router_settings(RoutingPolicySpec.model_validate(POLICY)))
    )
    r.set_api_keys(dict(KEYS))
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(1, timeout=10)
    try:
        yield r, ep
    finally:
        await r.stop(0)
        await ep.stop(None)


async def _first_sse_event(r: RouterServer, s: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    req = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 2000, "stream": True}
    resp = await s.post(
        r.http_url + "/v1/completions", json=req, headers={"Authorization": "Bearer key-gold"}
    )
    assert resp.status == 200
    line = await resp.content.readline()
    assert line.startswith(b"data: ")
    return resp


async def test_a_client_that_leaves_mid_stream_releases_its_slot(
    sim_router: tuple[RouterServer, Any],
) -> None:
    r, _ = sim_router
    async with aiohttp.ClientSession() as s:
        resp = await _first_sse_event(r, s)
        assert held(r)["gold"] == (0, 1)
        resp.close()  # the client goes away mid-stream
    await wait_until(lambda: held(r)["gold"] == (0, 0), timeout=30, what="slot released after disconnect")
    await wait_until(lambda: not r.fleet.replicas["s0"].in_flight, timeout=30, what="engine request ended")


async def test_an_engine_failure_mid_stream_releases_the_slot(sim_router: tuple[RouterServer, Any]) -> None:
    r, ep = sim_router
    async with aiohttp.ClientSession() as s:
        resp = await _first_sse_event(r, s)
        await ep.stop(None)  # the engine dies while streaming
        body = await asyncio.wait_for(resp.content.read(), 30)
    assert b'"error"' in body  # the stream ends with an error event, not a hang
    await wait_until(lambda: held(r)["gold"] == (0, 0), timeout=30, what="slot released after engine failure")
