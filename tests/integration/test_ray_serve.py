"""The data plane on a real local Ray Serve: one module-scoped cluster (2 GPU classes, 3 engine replicas,
2 router replicas) deployed from the Serve config exactly as ``corral serve`` does, exercised over real
gRPC and HTTP. Every wait is a condition with a deadline."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import grpc
import orjson
import pytest
import requests
from corral.serve.local_adapters import make_tiny_adapter
from corral.serve.local_stack import LocalOptions, LocalStack
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

T = TypeVar("T")
MODEL = "tiny-llama"

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "itest"},
    "spec": {
        "models": [{"name": MODEL, "baseModel": "tiny/llama", "engine": "sim", "maxModelLen": 4096}],
        "gpuClasses": [
            {"name": "h100", "gpusPerReplica": 1, "minReplicas": 1, "maxReplicas": 2, "replicas": 2,
             "profile": "H100"},
            {"name": "a100", "gpusPerReplica": 1, "minReplicas": 1, "maxReplicas": 1, "profile": "A100-80GB"},
        ],
        "adapters": [],  # filled with generated file:// adapters by the fixture
        "adapterCache": {"gpuSlots": 2, "cpuSlots": 4},
    },
}  # fmt: skip
POLICY: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "itest"},
    "spec": {"poolRef": "itest", "strategy": "corral", "blockSize": 16, "ttftSloMs": 2000,
             "adapterPaging": {"prefetchToCpu": False, "replicationDemandRps": 1.0}},
}  # fmt: skip
ADAPTERS = ("hot", "warm", "cold")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("ray")
    pool = copy.deepcopy(POOL)
    pool["spec"]["adapters"] = [
        {"name": n, "baseModel": MODEL, "rank": 8, "source": make_tiny_adapter(tmp / n, rank=8).as_uri()}
        for n in ADAPTERS
    ]
    opts = LocalOptions(
        max_replicas_per_class=2,
        router_replicas=2,
        num_cpus=2,
        adapter_cache=tmp / "cache",
        sim_time_scale=4.0,
    )
    s = LocalStack([(pool, copy.deepcopy(POLICY))], opts, log=lambda *_: None)
    try:
        s.start(timeout_s=300)
        yield s
    finally:
        s.stop()


def routers(stack: LocalStack) -> list[Any]:
    rs = stack.routers()
    assert len(rs) == 2, rs
    return sorted(rs, key=lambda r: r.router_id)


def router_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle("router", app_name="corral-itest")


def engine_records() -> list[dict[str, Any]]:
    import ray
    from corral.serve.registry import get_registry

    return ray.get(get_registry("corral").list_engines.remote("itest"), timeout=10)[1]


def complete(http: str, prompt: str, model: str = MODEL, max_tokens: int = 4, **kw: Any) -> requests.Response:
    rid = kw.pop("request_id", None) or f"it-{uuid.uuid4().hex[:10]}"
    return requests.post(
        http + "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, **kw},
        headers={"x-request-id": rid},
        timeout=60,
    )


def engine_adapter_tiers(address: str) -> dict[str, str]:
    """The engine's own truth: the first StreamEvents message is a snapshot with adapters by tier."""
    from corral.v1 import engine_pb2, engine_pb2_grpc

    async def snap() -> dict[str, str]:
        async with grpc.aio.insecure_channel(address) as ch:
            call = engine_pb2_grpc.EngineStub(ch).StreamEvents(engine_pb2.Subscribe(subscriber="itest"))
            async for batch in call:
                call.cancel()
                return {a.name: a.tier for a in batch.adapters}
        return {}

    return asyncio.run(asyncio.wait_for(snap(), 10))


# ---- tests -------------------------------------------------------------------------------------------


def test_streaming_over_http_and_grpc(stack: LocalStack) -> None:
    from corral.v1 import router_pb2, router_pb2_grpc

    r = routers(stack)[0]
    body: dict[str, Any] = {"model": MODEL, "prompt": "stream me " * 30, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with requests.post(r.http + "/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln[6:] for ln in resp.iter_lines() if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert {e["engine"] for e in engine_records()} == {"sim"}  # the wall-clock simulator, token by token
    assert len([c for c in chunks if c["choices"]]) >= 8
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 8

    with grpc.insecure_channel(r.grpc) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        req = router_pb2.CompletionRequest(model=MODEL, prompt="hi " * 40, max_tokens=6)
        got = list(stub.GenerateStream(req, timeout=60))
        assert got and got[0].replica_id and got[-1].finish_reason
        assert sum(len(c.token_ids) for c in got) == 6 and len(got) >= 6
        models = stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        ids = {m.id for m in models.models}
        assert MODEL in ids and set(ADAPTERS) <= ids


def wait_settled(router: Any, prompt: str, timeout: float = 15.0) -> None:
    """Wait until a dry run of ``prompt`` sees no queue on any candidate: sequential requests are then judged
    on cache and GPU class alone (an engine's load sample can trail a finished request by a sample period,
    longer on a loaded machine, and a busy-looking holder may rightly lose to a cold idle replica)."""
    from corral.v1 import router_pb2, router_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(router.grpc) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        while True:
            req = router_pb2.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=4)
            ex = stub.Explain(router_pb2.ExplainRequest(request=req), timeout=10)
            if ex.candidates and all(c.queue_s == 0 for c in ex.candidates):
                return
            assert time.monotonic() < deadline, f"router view not settled after {timeout}s: {ex}"
            time.sleep(0.05)


def explain(router: Any, resp: requests.Response) -> Any:
    """The router's decision for a completed request (by the router's own request id: client ids are
    labels only)."""
    from corral.v1 import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(router.grpc) as ch:
        return router_pb2_grpc.RouterStub(ch).Explain(
            router_pb2.ExplainRequest(request_id=resp.json()["id"]), timeout=10
        )


def test_repeated_prefix_lands_on_a_replica_holding_it(stack: LocalStack) -> None:
    """The deployed router runs the shipped RoutingPolicy (precise prefix index from the engines' KV
    events): once the shared prefix is cached somewhere, each request goes to a replica holding it. Which
    one is the cost model's call (with a short prefix a cold H100 beats a warm A100), so the test checks
    the hit, not one fixed replica."""
    r = routers(stack)[0]
    # ~2300 tokens: long enough that a cache hit beats any cold replica (H100 cold ~45 ms, A100 warm ~20 ms)
    prefix = "You are a meticulous assistant for the prefix affinity test. " * 150
    seen, hits = [], []
    for i in range(6):
        if i:  # the router's view settled: the previous request's end reached the load samples
            wait_settled(r, prefix + f" question number {i}?")
        resp = complete(r.http, prefix + f" question number {i}?")
        assert resp.status_code == 200, resp.text
        seen.append(resp.headers["x-corral-replica"])
        ex = explain(r, resp)
        assert ex.replica_id == seen[-1] and ex.policy == "corral"
        hits.append((ex.cached_blocks, ex.prompt_blocks))
    warm = hits[1:]  # the prefix is on a replica since the first request (its KV events say so)
    assert all(c >= p - 2 > 0 for c, p in warm), (hits, seen)
    assert len(set(seen)) <= 2, seen  # the prefix is not sprayed over the fleet


def dry_run(router: Any, prompt: str) -> Any:
    """The decision ``router`` would make for ``prompt`` now (Explain dry run: nothing is dispatched)."""
    from corral.v1 import router_pb2, router_pb2_grpc

    req = router_pb2.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=4)
    with grpc.insecure_channel(router.grpc) as ch:
        return router_pb2_grpc.RouterStub(ch).Explain(router_pb2.ExplainRequest(request=req), timeout=10)


def test_two_router_replicas_see_the_same_cached_prefixes(stack: LocalStack) -> None:
    """Active-active routers each rebuild the engines' state from their KV events: a prefix one router
    placed becomes a hit for the other as soon as the engine's BlockStored event reaches it."""
    a, b = routers(stack)
    prefix = (
        "Shared context for active-active routers: " + "lorem ipsum dolor sit amet " * 400
    )  # ~2700 tokens
    first = complete(a.http, prefix + " turn 0")
    assert first.status_code == 200, first.text
    holder = first.headers["x-corral-replica"]
    probe = prefix + " turn 1"

    def b_sees_it() -> Any:
        ex = dry_run(b, probe)
        held = {c.replica_id: c.cached_blocks for c in ex.candidates}
        return ex if held.get(holder, 0) >= ex.prompt_blocks - 2 > 0 else None

    wait_until(b_sees_it, 10, f"router {b.router_id} to see {holder}'s blocks (engine KV events)")
    for i in range(1, 5):
        r = b if i % 2 else a
        resp = complete(r.http, prefix + f" turn {i}")
        assert resp.status_code == 200, resp.text
        ex = explain(r, resp)
        assert ex.cached_blocks >= ex.prompt_blocks - 2 > 0, (i, r.router_id, ex)


def test_unknown_model_or_adapter_is_a_clear_404(stack: LocalStack) -> None:
    from corral.v1 import router_pb2, router_pb2_grpc

    r = routers(stack)[0]
    resp = complete(r.http, "hello", model="no-such-adapter")
    assert resp.status_code == 404
    assert "no-such-adapter" in resp.text and "not found" in resp.text
    with grpc.insecure_channel(r.grpc) as ch, pytest.raises(grpc.RpcError) as ei:
        router_pb2_grpc.RouterStub(ch).Generate(
            router_pb2.CompletionRequest(model="no-such-adapter", prompt="x"), timeout=10
        )
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_hot_adapter_gets_loaded_on_more_replicas(stack: LocalStack) -> None:
    rs = routers(stack)
    stop = time.monotonic() + 6.0
    n = 0
    while time.monotonic() < stop:  # ~10+ req/s for "hot", spread over both routers
        resp = complete(rs[n % 2].http, f"hot adapter request {n} " * 8, model="hot", max_tokens=1)
        assert resp.status_code == 200, resp.text
        n += 1

    def holders() -> list[str]:
        recs = engine_records()
        return [rec["replica_id"] for rec in recs if engine_adapter_tiers(rec["address"]).get("hot") == "gpu"]

    held = wait_until(lambda: len(h := holders()) >= 2 and h, 30, "'hot' on >= 2 replicas")
    assert held and len(held) >= 2
    stats = [router_handle().paging_stats.remote().result(timeout_s=10) for _ in range(4)]
    assert any(s["leader"] and s["loads"] >= 1 for s in stats), stats


def test_policy_change_applies_without_engine_restarts(stack: LocalStack) -> None:
    before = {(e["replica_id"], e["pid"]) for e in engine_records()}
    router_pids = {r.router_id for r in routers(stack)}
    new = copy.deepcopy(POLICY)
    new["spec"]["strategy"] = "least_loaded"
    stack.update_policy(new)

    def both_switched() -> bool:
        seen = {}
        for _ in range(8):
            a = router_handle().addresses.remote().result(timeout_s=10)
            seen[a["router_id"]] = a["policy"]
        return len(seen) == 2 and set(seen.values()) == {"least_loaded"}

    wait_until(both_switched, 60, "both routers on least_loaded")
    resp = complete(routers(stack)[0].http, "after the policy change " * 5)
    assert resp.status_code == 200
    assert {(e["replica_id"], e["pid"]) for e in engine_records()} == before
    assert {r.router_id for r in routers(stack)} == router_pids  # reconfigured in place, not restarted
    stack.update_policy(copy.deepcopy(POLICY))


def test_killing_an_engine_loses_no_request_that_had_not_started(stack: LocalStack) -> None:
    import aiohttp
    import ray

    r = routers(stack)[0]
    victim = next(e for e in engine_records() if e["gpu_class"] == "h100")
    outcomes: list[str] = []

    async def client(i: int, until: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            k = 0
            while time.monotonic() < until:
                body = {
                    "model": MODEL,
                    "prompt": f"client {i} request {k} " * 10,
                    "max_tokens": 6,
                    "stream": True,
                }
                k += 1
                async with s.post(r.http + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        outcomes.append(f"http {resp.status}: {(await resp.text())[:200]}")
                        continue
                    text = await resp.text()
                    outcomes.append("ok" if "[DONE]" in text and '"error"' not in text else "mid-stream")

    async def main() -> None:
        until = time.monotonic() + 8
        clients = [asyncio.create_task(client(i, until)) for i in range(3)]
        await asyncio.sleep(2)
        tag = victim["replica_id"].rsplit("-", 1)[-1]
        named = ray.util.list_named_actors(all_namespaces=True)
        actors = [a for a in named if a["name"].startswith("SERVE_REPLICA::") and tag in a["name"]]
        assert len(actors) == 1, actors
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
        await asyncio.gather(*clients)

    asyncio.run(main())
    failed_before_start = [o for o in outcomes if o.startswith("http")]
    assert outcomes.count("ok") > 10
    assert failed_before_start == [], failed_before_start
    # The dead replica leaves the routers' view, and Serve brings a replacement that registers itself.
    wait_until(
        lambda: victim["replica_id"] not in router_handle().fleet_view.remote().result(timeout_s=10),
        30,
        "the killed replica to leave routing",
    )
    wait_until(
        lambda: (
            len([e for e in engine_records() if e["gpu_class"] == "h100"]) == 2
            and victim["replica_id"] not in {e["replica_id"] for e in engine_records()}
        ),
        120,
        "a replacement h100 replica",
    )


def test_adapter_files_are_real_safetensors(tmp_path: Path) -> None:
    from corral.serve.adapter_sources import fetch_adapter

    art = fetch_adapter("x", make_tiny_adapter(tmp_path / "x", rank=8).as_uri(), tmp_path / "c")
    assert art.rank == 8 and art.tensors == 4


def test_corral_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM (systemd, Kubernetes, ``timeout``) stops ``corral serve`` like Ctrl-C: "stopping…", exit 0,
    not Ray's stack dump."""
    import signal
    import subprocess
    import sys

    examples = Path(__file__).resolve().parents[2] / "manifests" / "examples"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.api.cli", "serve", "-f", str(examples)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "serving; press" in log.read_text(errors="replace") or proc.poll() is not None,
                   180, "corral serve to be up")  # fmt: skip
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text(errors="replace")[-3000:]
        text = log.read_text(errors="replace")
        assert "stopping" in text and "SIGTERM received" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
