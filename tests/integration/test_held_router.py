"""Router-side queues of a holding policy (``dualmap_paper``) in a real router over real sockets: requests
wait at the router while the replica's dispatch gate is closed, go on when it opens, a client that
disconnects while held leaves the queue, and no count is left behind."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from corral.api.routingpolicy import RoutingPolicySpec
from corral.router.server import RouterConfig, RouterServer
from corral.router.settings import router_settings
from corral.router.types import RoutingRequest
from corral.serve.endpoint import EchoEngine, EngineEndpoint
from waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "echo"


@pytest.fixture
async def router() -> AsyncIterator[tuple[RouterServer, EchoEngine]]:
    eng = EchoEngine(replica_id="e0", model=MODEL, profile="H100", gpu_class="H100")
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0)
    spec = RoutingPolicySpec.model_validate({"poolRef": "p", "strategy": "dualmap"})
    r = RouterServer([ep.address], RouterConfig.from_settings(router_settings(spec)))
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(1, timeout=10)
    try:
        yield r, eng
    finally:
        await r.stop(0)
        await ep.stop(None)


async def post(r: RouterServer, prompt: str) -> tuple[int, dict[str, Any]]:
    req = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(r.http_url + "/v1/completions", json=req) as resp:
        return resp.status, json.loads(await resp.text())


async def test_requests_wait_in_the_router_queue_until_the_gate_opens(
    router: tuple[RouterServer, EchoEngine],
) -> None:
    srv, eng = router
    srv.router.update_policy("dualmap_paper")
    core = srv.router.core
    assert core.holds
    busy = RoutingRequest("busy", MODEL, [], 8, 2)
    core.dispatch("e0", busy)  # a request awaiting its prefill on the only replica: the gate is closed
    tasks = [asyncio.create_task(post(srv, f"hello number {k}")) for k in range(3)]
    await wait_until(lambda: len(core.held) == 3, timeout=10, what="three requests held at the router")
    assert eng.served == 0
    tasks[2].cancel()  # the HTTP client disconnects while held
    await asyncio.gather(tasks[2], return_exceptions=True)
    await wait_until(lambda: len(core.held) == 2, timeout=10, what="the disconnected request dropped")
    core.first_token("e0", "busy")
    core.finish("e0", "busy")  # the replica is idle: the queue drains, one prefill at a time
    results = await asyncio.wait_for(asyncio.gather(*tasks[:2]), 30)
    assert [s for s, _ in results] == [200, 200]
    assert all(out["choices"][0]["finish_reason"] for _, out in results)
    assert eng.served == 2  # the disconnected one never reached the engine
    rep = core.fleet.replicas["e0"]
    await wait_until(lambda: not rep.in_flight, timeout=10, what="no request left in flight")
    assert len(core.held) == 0 and rep.pending_prefill_tokens == 0 and rep.decode_requests == 0


async def test_a_held_request_whose_replica_leaves_gets_a_503_naming_the_cause(
    router: tuple[RouterServer, EchoEngine],
) -> None:
    srv, eng = router
    srv.router.update_policy("dualmap_paper")
    core = srv.router.core
    core.dispatch("e0", RoutingRequest("busy", MODEL, [], 8, 2))  # the gate is closed
    task = asyncio.create_task(post(srv, "hello there"))
    await wait_until(lambda: len(core.held) == 1, timeout=10, what="the request held at the router")
    core.fleet.remove_replica("e0")  # the only replica leaves while the request is held
    status, out = await asyncio.wait_for(task, 30)
    assert status == 503 and "no healthy replica" in out["error"]["message"], out
    assert eng.served == 0 and len(core.held) == 0
