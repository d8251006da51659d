"""Data plane over real sockets (no Ray): sim engines of two GPU classes behind gRPC endpoints, and
Corral routers serving gRPC and OpenAI HTTP on 127.0.0.1.

Covers streaming (gRPC and SSE), prefix affinity (via Explain and metrics), clear 4xx / gRPC errors,
retry of requests whose engine dies before the first token, removal of dead or silent replicas within
the staleness bound, active-active consistency between two routers, and a live policy change.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from corral.router.server import RouterConfig, RouterServer
from corral.serve.endpoint import EchoEngine, EngineEndpoint, EngineRequest, TokenChunk
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

sim = pytest.importorskip("corral.serve.endpoint.sim")

MODEL = "llama-8b"
STALE_S = 0.5
TIME_SCALE = 20.0


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


class Fleet:
    def __init__(self) -> None:
        self.engines: list[Any] = []
        self.endpoints: list[EngineEndpoint] = []
        self.routers: list[RouterServer] = []

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self.endpoints]

    async def add_engine(self, engine: Any) -> EngineEndpoint:
        ep = await EngineEndpoint.start(engine, "127.0.0.1", 0, sample_period_s=0.05)
        self.engines.append(engine)
        self.endpoints.append(ep)
        return ep

    async def add_router(self, **cfg: Any) -> RouterServer:
        cfg.setdefault("policy", "corral")
        cfg.setdefault("stale_after_s", STALE_S)
        r = RouterServer(self.addresses, RouterConfig(**cfg))
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(len(self.endpoints), timeout=10)
        self.routers.append(r)
        return r

    async def kill(self, i: int) -> None:
        await self.endpoints[i].stop(None)
        close = getattr(self.engines[i], "close", None)
        if close is not None:
            await close()

    async def close(self) -> None:
        for r in self.routers:
            await r.stop(0)
        for i in range(len(self.endpoints)):
            await self.kill(i)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    for i, prof in enumerate(["H100", "H100", "A100-80GB", "A100-80GB"]):
        eng = sim.SimEndpointEngine.create(
            prof, f"{prof.lower()}-{i}", MODEL, time_scale=TIME_SCALE, max_model_len=8192
        )
        await f.add_engine(eng)
    try:
        yield f
    finally:
        await f.close()


def stub(r: RouterServer) -> rpb_grpc.RouterStub:
    return rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, dict(resp.headers)


PREFIX = "You are a helpful assistant for the Corral project. " * 160  # ~2k sim tokens, ~130 blocks


# ---- streaming -----------------------------------------------------------------------------------
async def test_grpc_stream_and_unary(fleet: Fleet) -> None:
    r = await fleet.add_router()
    st = stub(r)
    chunks = [
        c async for c in st.GenerateStream(rpb.CompletionRequest(model=MODEL, prompt="hello", max_tokens=8))
    ]
    assert len(chunks) >= 2  # tokens arrive as the sim steps, not in one piece
    assert chunks[0].replica_id
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8
    assert sum(len(c.token_ids) for c in chunks) == 8
    resp = await st.Generate(rpb.CompletionRequest(model=MODEL, prompt="hello", max_tokens=5))
    assert len(resp.token_ids) == 5 and resp.finish_reason == "length" and resp.replica_id
    models = await st.ListModels(rpb.ListModelsRequest())
    card = next(m for m in models.models if m.id == MODEL)
    assert card.replicas == 4 and sorted(card.gpu_classes) == ["A100-80GB", "H100"]
    h = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(r.grpc_address))
    assert (
        await h.Check(health_pb2.HealthCheckRequest(service=""))
    ).status == health_pb2.HealthCheckResponse.SERVING


async def test_http_sse_stream_and_json(fleet: Fleet) -> None:
    r = await fleet.add_router()
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    async with aiohttp.ClientSession() as s, s.post(r.http_url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            t = line.decode().strip()
            if t.startswith("data: "):
                events.append(t[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) >= 2 and len("".join(texts)) == 6
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    # chat, streaming
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(r.http_url + "/v1/chat/completions", json=chat) as resp:
        raw = (await resp.read()).decode()
    lines = [ln[6:] for ln in raw.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    first = json.loads(lines[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    # non-streaming JSON
    status, out, headers = await post(
        r.http_url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4}
    )
    assert status == 200 and out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 4
    assert headers["x-corral-replica"] in r.fleet.replicas
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/v1/models") as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids == [MODEL]


# ---- prefix affinity -----------------------------------------------------------------------------
async def test_repeated_prefix_lands_on_holder(fleet: Fleet) -> None:
    r = await fleet.add_router()
    st = stub(r)
    first = await st.Generate(rpb.CompletionRequest(model=MODEL, prompt=PREFIX + "Question 0?", max_tokens=2))
    holder = first.replica_id
    for i in range(1, 6):
        resp = await st.Generate(
            rpb.CompletionRequest(model=MODEL, prompt=PREFIX + f"Question {i}?", max_tokens=2)
        )
        ex = await st.Explain(rpb.ExplainRequest(request_id=resp.request_id))
        assert ex.replica_id == holder == resp.replica_id
        assert ex.cached_blocks >= 100, ex
        assert {c.replica_id for c in ex.candidates} == set(r.fleet.replicas)
        held = next(c for c in ex.candidates if c.replica_id == holder)
        assert held.cached_blocks >= 100 and held.prefill_s < max(c.prefill_s for c in ex.candidates)
        assert resp.usage.cached_tokens > 0  # the engine really reused it
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/metrics") as resp:
        text = await resp.text()
    hits = next(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("corral_prefix_hit_blocks_total")
    )
    assert hits >= 500
    assert (
        f'corral_decisions_total{{gpu_class="{r.fleet.replicas[holder].gpu_class}",policy="corral",replica="{holder}"}}'
        in text
    )


# ---- errors --------------------------------------------------------------------------------------
async def test_errors_are_clear(fleet: Fleet, tmp_path: Any) -> None:
    r = await fleet.add_router()
    url = r.http_url + "/v1/completions"
    status, out, _ = await post(url, {"model": "no-such-lora", "prompt": "x"})
    assert status == 404
    assert out["error"]["type"] == "not_found_error" and out["error"]["code"] == 404
    assert "model 'no-such-lora' not found; available: " + MODEL in out["error"]["message"]
    status, out, _ = await post(url, '{"model": "llama-8b", "prompt": ')
    assert status == 400 and "malformed JSON" in out["error"]["message"]
    status, out, _ = await post(url, {"prompt": "x"})
    assert status == 400 and "'model'" in out["error"]["message"]
    status, out, _ = await post(url, {"model": MODEL})
    assert status == 400 and "'prompt'" in out["error"]["message"]
    status, out, _ = await post(url, {"model": MODEL, "prompt": "x", "max_tokens": "ten"})
    assert status == 400 and "'max_tokens'" in out["error"]["message"]
    # the sim tokenizer: 4 bytes a token; the length is checked in tokens
    status, out, _ = await post(url, {"model": MODEL, "prompt": "y" * 32000, "max_tokens": 500})
    assert status == 400 and "8000 tokens" in out["error"]["message"] and "8192" in out["error"]["message"]
    # far over what 8192 tokens can hold: refused by size, before tokenizing
    status, out, _ = await post(url, {"model": MODEL, "prompt": "y" * 40000, "max_tokens": 16})
    assert status == 400 and "40000 characters" in out["error"]["message"], out
    status, out, _ = await post(r.http_url + "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert status == 400 and "'messages'" in out["error"]["message"]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub(r).Generate(rpb.CompletionRequest(model="no-such-lora", prompt="x"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "available: " + MODEL in (
        ei.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub(r).Generate(rpb.CompletionRequest(model=MODEL))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # API keys from a file -> tenants; 401 with a clear message
    keys = tmp_path / "keys.yaml"
    from corral.router.server import load_api_keys
    from corral.router.server.auth import hash_key

    keys.write_text(f"{hash_key('sk-alpha')}: tenant-a\n")  # the file holds digests, never keys

    r.router.set_api_keys(load_api_keys(keys))
    status, out, _ = await post(url, {"model": MODEL, "prompt": "x"})
    assert status == 401 and "missing API key" in out["error"]["message"]
    status, out, _ = await post(url, {"model": MODEL, "prompt": "x"}, {"Authorization": "Bearer nope"})
    assert status == 401 and out["error"]["message"] == "invalid API key"
    status, out, _ = await post(
        url, {"model": MODEL, "prompt": "x", "max_tokens": 2}, {"Authorization": "Bearer sk-alpha"}
    )
    assert status == 200
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt="x"))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = await stub(r).Generate(
        rpb.CompletionRequest(model=MODEL, prompt="x", max_tokens=2),
        metadata=(("authorization", "Bearer sk-alpha"),),
    )
    assert resp.finish_reason == "length"


async def test_adapters_known_unknown(fleet: Fleet) -> None:
    r = await fleet.add_router()
    eng_stub = epb_grpc.EngineStub(grpc.aio.insecure_channel(fleet.addresses[0]))
    # the engine refuses an adapter nobody registered
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        req = epb.GenerateRequest(
            request_id="a1", model=MODEL, adapter="ghost", prompt_token_ids=[1, 2], max_tokens=2
        )
        async for _ in eng_stub.Generate(req):
            pass
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    reply = await eng_stub.LoadAdapter(
        epb.LoadAdapterRequest(name="sql-lora", source_uri="file:///tmp/sql", tier="gpu")
    )
    assert reply.tier == "gpu"
    await wait_until(lambda: "sql-lora" in r.router.available_models(), what="adapter visible")
    status, out, _ = await post(
        r.http_url + "/v1/completions", {"model": "sql-lora", "prompt": "select", "max_tokens": 3}
    )
    assert status == 200, out
    assert out["model"] == "sql-lora"
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/v1/models") as resp:
        cards = {m["id"]: m for m in (await resp.json())["data"]}
    assert cards["sql-lora"]["parent"] == MODEL
    status, out, _ = await post(r.http_url + "/v1/completions", {"model": "ghost", "prompt": "x"})
    assert status == 404 and "sql-lora" in out["error"]["message"]


# ---- failures ------------------------------------------------------------------------------------
class FailingEngine(EchoEngine):
    """Fails every request before its first token (a broken replica that still sends events)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        self.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # pragma: no cover


async def test_failure_before_first_token_is_retried() -> None:
    f = Fleet()
    bad = FailingEngine(replica_id="a-bad", model=MODEL, profile="H100", gpu_class="H100")
    await f.add_engine(bad)
    await f.add_engine(EchoEngine(replica_id="b-good", model=MODEL, profile="H100", gpu_class="H100"))
    try:
        r = await f.add_router(policy="round_robin")
        st = stub(r)
        for _ in range(6):
            resp = await st.Generate(rpb.CompletionRequest(model=MODEL, prompt="hello", max_tokens=2))
            assert resp.replica_id == "b-good"
        assert bad.calls >= 1
        ex = [rec for rec in r.router.explains.values() if len(rec.attempts) > 1]
        assert ex and ex[0].attempts == ["a-bad", "b-good"]
    finally:
        await f.close()


async def test_engine_killed_mid_run(fleet: Fleet) -> None:
    r = await fleet.add_router(policy="round_robin")
    victim = fleet.engines[0].info.replica_id
    url = r.http_url + "/v1/completions"
    results: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        # long prompts keep requests queued in prefill, long outputs keep others streaming
        body = {"model": MODEL, "prompt": f"{i:05d} " + "z" * 12000, "max_tokens": 64, "stream": True}
        got = 0
        err = None
        async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
            if resp.status != 200:
                results.append({"i": i, "tokens": 0, "status": resp.status, "error": await resp.text()})
                return
            async for line in resp.content:
                t = line.decode().strip()
                if not t.startswith("data: ") or t == "data: [DONE]":
                    continue
                ev = json.loads(t[6:])
                if "error" in ev:
                    err = ev["error"]
                else:
                    got += len(ev["choices"][0]["text"]) if ev["choices"] else 0
            results.append({"i": i, "tokens": got, "status": 200, "error": err,
                            "replica": resp.headers.get("x-corral-replica")})  # fmt: skip

    tasks = [asyncio.create_task(one(i)) for i in range(24)]

    # kill once the victim has work in flight
    def mixed() -> bool:  # some of its requests streaming, some still waiting for their first token
        fl = r.fleet.replicas[victim].in_flight.values()
        return any(f.started for f in fl) and any(not f.started for f in fl)

    await wait_until(mixed, what="victim busy with started and queued requests")
    t_kill = time.monotonic()
    await fleet.kill(0)
    left = await wait_until(
        lambda: victim not in r.fleet.replicas, timeout=STALE_S * 4, what="victim removed"
    )
    await asyncio.gather(*tasks)
    assert left <= STALE_S * 2, left
    assert len(results) == 24
    lost = [x for x in results if x["status"] != 200 or (x["error"] and x["tokens"] == 0)]
    assert not lost, lost  # nothing that had not started streaming is lost
    broken = [x for x in results if x["error"]]
    for x in broken:  # those that had started get a clear error naming the replica
        assert x["tokens"] > 0 and victim in x["error"]["message"] and x["error"]["type"] == "engine_error"
    ok = [x for x in results if not x["error"]]
    assert all(x["tokens"] == 64 for x in ok)
    retried = [rec for rec in r.router.explains.values() if len(rec.attempts) > 1]
    assert all(rec.attempts[0] == victim for rec in retried)
    print(
        f"killed {victim}: {len(retried)} retried before their first token, {len(broken)} broken mid-stream"
    )
    assert retried and broken  # the kill hit requests both before and after their first token
    # the dead replica gets no new requests
    for _ in range(8):
        resp = await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt="after", max_tokens=2))
        assert resp.replica_id != victim
    assert time.monotonic() - t_kill < 60


async def test_silent_replica_leaves_and_returns(fleet: Fleet) -> None:
    r = await fleet.add_router()
    ep = fleet.endpoints[1]
    rid = fleet.engines[1].info.replica_id
    ep.pause_events(True)
    left = await wait_until(
        lambda: rid not in r.fleet.replicas, timeout=STALE_S * 4, what="silent replica removed"
    )
    assert left <= STALE_S * 2
    for _ in range(6):
        resp = await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt="x", max_tokens=1))
        assert resp.replica_id != rid
    ep.pause_events(False)
    await wait_until(lambda: rid in r.fleet.replicas, timeout=5, what="replica back")


# ---- active-active and live policy ---------------------------------------------------------------
async def test_two_routers_route_prefix_consistently(fleet: Fleet) -> None:
    a = await fleet.add_router()
    b = await fleet.add_router()
    prompt = PREFIX + "Where is the corral?"
    first = await stub(a).Generate(rpb.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=2))
    holder = first.replica_id
    hashes = a.router.prepare(MODEL, prompt, None, 2).rr.block_hashes
    # router b learns what the engine holds from the engine's events, not from router a
    await wait_until(
        lambda: b.fleet.replicas[holder].index.match(hashes) >= len(hashes) - 1, what="b sees blocks"
    )
    for i in range(4):
        p = PREFIX + f"Follow-up {i}"
        ex_a = await stub(a).Explain(rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=p)))
        ex_b = await stub(b).Explain(rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=p)))
        assert ex_a.dry_run and ex_b.dry_run
        assert ex_a.replica_id == ex_b.replica_id == holder
        resp = await stub(b if i % 2 else a).Generate(
            rpb.CompletionRequest(model=MODEL, prompt=p, max_tokens=2)
        )
        assert resp.replica_id == holder


async def test_policy_change_applies_live(fleet: Fleet) -> None:
    r = await fleet.add_router()
    conns_before = dict(r.router.pool.by_replica)
    st = stub(r)
    resp = await st.Generate(rpb.CompletionRequest(model=MODEL, prompt=PREFIX, max_tokens=2))
    assert (await st.Explain(rpb.ExplainRequest(request_id=resp.request_id))).policy == "corral"
    inflight = asyncio.ensure_future(
        st.Generate(rpb.CompletionRequest(model=MODEL, prompt="long", max_tokens=64))
    )
    r.update_policy("round_robin", {})
    seen = set()
    for _ in range(8):
        resp = await st.Generate(rpb.CompletionRequest(model=MODEL, prompt=PREFIX, max_tokens=1))
        ex = await st.Explain(rpb.ExplainRequest(request_id=resp.request_id))
        assert ex.policy == "round_robin"
        seen.add(resp.replica_id)
    assert len(seen) == 4  # the same prefix now spreads: the new policy decides
    assert (await inflight).finish_reason == "length"  # in-flight request unaffected
    assert r.router.pool.by_replica == conns_before  # same engine streams: nothing restarted
    with pytest.raises(ValueError, match="unknown routing policy"):
        r.update_policy("nope", {})
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/metrics") as resp2:
        assert 'corral_router_policy{policy="round_robin"} 1.0' in await resp2.text()


# ---- request validation, real tokens, request ids (issue 9 items 1 and 6) -----------------------------
def _tokenizer_testkit() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "unit" / "tokenizer_testkit.py"
    spec = importlib.util.spec_from_file_location("tokenizer_testkit", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class RecordingEngine(EchoEngine):
    """An echo engine that keeps every request it was sent."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.requests: list[EngineRequest] = []

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenChunk]:
        self.requests.append(req)
        async for c in super().generate(req):
            yield c


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


async def _metrics(r: RouterServer) -> str:
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/metrics") as resp:
        return await resp.text()


async def test_queue_bound_refuses_with_429_and_retry_after(fleet: Fleet) -> None:
    """RoutingPolicy load.maxQueueRequestsPerReplica: replicas at the bound take no more; when all are,
    HTTP 429 with Retry-After / gRPC RESOURCE_EXHAUSTED naming the field, and nothing is left pending."""
    from corral.router.types import RoutingRequest

    r = await fleet.add_router(max_queue_per_replica=1)
    core = r.router.core
    held = [RoutingRequest(f"held-{rid}", MODEL, [], 64, 4) for rid in sorted(r.fleet.replicas)]
    for h, rid in zip(held, sorted(r.fleet.replicas), strict=True):
        core.dispatch(rid, h)  # one request waiting on every replica (no first token yet)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    status, out, headers = await post(r.http_url + "/v1/completions", body)
    assert status == 429, out
    assert "maxQueueRequestsPerReplica" in out["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt="hello", max_tokens=2))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    core.finish(sorted(r.fleet.replicas)[0], held[0].request_id)  # room on one replica again
    status, out, headers = await post(r.http_url + "/v1/completions", body)
    assert status == 200 and headers["x-corral-replica"] == sorted(r.fleet.replicas)[0]
    for h, rid in zip(held[1:], sorted(r.fleet.replicas)[1:], strict=True):
        core.finish(rid, h.request_id)
    assert all(not x.in_flight for x in r.fleet.replicas.values())


async def test_bad_requests_get_4xx_naming_the_field() -> None:
    f = Fleet()
    eng = RecordingEngine(replica_id="e0", model=MODEL, profile="H100", gpu_class="H100")
    await f.add_engine(eng)
    try:
        r = await f.add_router(policy="round_robin")
        url = r.http_url + "/v1/completions"
        chat_url = r.http_url + "/v1/chat/completions"
        ok = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        cases: list[tuple[str, dict[str, Any], str]] = [
            (url, {**ok, "seed": -1}, "'seed'"),
            (url, {**ok, "seed": 1 << 64}, "'seed'"),
            (url, {**ok, "top_k": -5}, "'top_k'"),
            (url, {**ok, "top_k": 1 << 40}, "'top_k'"),
            (url, {**ok, "prompt": [1, 1 << 32]}, "prompt[1]"),
            (url, {**ok, "prompt": [-3]}, "prompt[0]"),
            (url, {**ok, "max_tokens": 1 << 32}, "'max_tokens'"),
            (url, {**ok, "max_tokens": 0}, "'max_tokens'"),
            (url, {**ok, "temperature": 2.5}, "'temperature'"),
            (url, {**ok, "temperature": -0.1}, "'temperature'"),
            (url, {**ok, "top_p": 0}, "'top_p'"),
            (url, {**ok, "top_p": 1.5}, "'top_p'"),
            (url, {**ok, "n": 2}, "'n'"),
            (url, {**ok, "prompt": ["a", "b"]}, "'prompt'"),
            (chat_url, {"model": MODEL, "messages": [{"role": "user", "content": [{"text": 3}]}]},
             "'messages[0].content'"),
            (chat_url, {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "'messages[0].content'"),
        ]  # fmt: skip
        for u, body, field in cases:
            status, out, _ = await post(u, body)
            assert status == 400, (body, out)
            assert field in out["error"]["message"], (body, out)
            assert out["error"]["type"] == "invalid_request_error" and out["error"]["code"] == 400
        assert not eng.requests  # nothing reached the engine
        assert _metric(await _metrics(r), 'corral_requests_total{api="http",code="400"}') == len(cases)
        # unknown fields are ignored, as OpenAI servers do; an omitted temperature is OpenAI's 1.0
        status, out, _ = await post(url, {**ok, "logit_bias": {}, "frequency_penalty": 0, "whatever": 1})
        assert status == 200, out
        assert eng.requests[-1].temperature == 1.0
        status, out, _ = await post(url, {**ok, "temperature": 0})
        assert status == 200 and eng.requests[-1].temperature == 0.0

        st = stub(r)
        grpc_cases = [
            (epb.SamplingParams(seed=1 << 63), "seed"),
            (epb.SamplingParams(top_k=-2), "top_k"),
            (epb.SamplingParams(temperature=5), "temperature"),
            (epb.SamplingParams(top_p=1.5), "top_p"),
        ]
        for sp, field in grpc_cases:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await st.Generate(rpb.CompletionRequest(model=MODEL, prompt="x", sampling=sp))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sp
            assert field in (ei.value.details() or "")
        n = len(eng.requests)
        await st.Generate(rpb.CompletionRequest(model=MODEL, prompt="x", max_tokens=1))
        assert len(eng.requests) == n + 1 and eng.requests[-1].temperature == 1.0  # no sampling: OpenAI's
    finally:
        await f.close()


async def test_unexpected_errors_are_openai_shaped_500s(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await fleet.add_router()

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(r.router, "resolve_model", boom)
    status, out, _ = await post(r.http_url + "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 500
    assert out["error"]["type"] == "internal_error" and out["error"]["code"] == 500
    assert "kaboom" in out["error"]["message"]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt="x"))
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    text = await _metrics(r)
    assert _metric(text, 'corral_requests_total{api="http",code="500"}') == 1
    assert _metric(text, 'corral_requests_total{api="grpc",code="500"}') == 1
    assert _metric(text, 'corral_requests_total{api="http",code="200"}') == 0


async def test_client_request_ids_are_labels_not_keys() -> None:
    f = Fleet()
    await f.add_engine(sim.SimEndpointEngine.create("H100", "h0", MODEL, time_scale=TIME_SCALE))
    try:
        r = await f.add_router(policy="round_robin")
        rep = next(iter(r.fleet.replicas.values()))
        body = {"model": MODEL, "prompt": "same id " * 200, "max_tokens": 8}
        got = await asyncio.gather(
            *(post(r.http_url + "/v1/completions", body, {"x-request-id": "dup"}) for _ in range(4))
        )
        assert all(status == 200 for status, _, _ in got), got
        heads = [{k.lower(): v for k, v in h.items()} for _, _, h in got]
        assert all(h["x-request-id"] == "dup" for h in heads)  # the client's id: echoed, as a label
        internal = {h["x-corral-request-id"] for h in heads}
        assert internal == {out["id"] for _, out, _ in got}
        assert len(internal) == 4 and "dup" not in internal
        st = stub(r)
        dup = rpb.CompletionRequest(model=MODEL, prompt="g " * 300, max_tokens=4, request_id="dup")
        resps = await asyncio.gather(*(st.Generate(dup) for _ in range(3)))
        assert {x.client_request_id for x in resps} == {"dup"} and len({x.request_id for x in resps}) == 3
        # every request's accounting was released: nothing pending on the replica forever
        await wait_until(lambda: not rep.in_flight, timeout=5, what="in-flight cleared")
        assert rep.pending_prefill_tokens == 0
    finally:
        await f.close()


async def test_router_tokenizes_with_the_models_tokenizer(tmp_path: Any) -> None:
    from corral.router.hashing import block_hashes
    from corral.router.tokenizer import load_tokenizer

    kit = _tokenizer_testkit()
    tok = load_tokenizer(str(kit.make_tokenizer(tmp_path / "tok")))
    f = Fleet()
    eng = RecordingEngine(replica_id="e0", model=MODEL, profile="H100", gpu_class="H100", max_model_len=64,
                          block_size=4)  # fmt: skip
    await f.add_engine(eng)
    try:
        r = await f.add_router(policy="round_robin", tokenizers={MODEL: tok})
        url = r.http_url + "/v1/completions"
        text = kit.SYSTEM + " Where is the corral?"  # ~110 bytes, far fewer tokens
        assert len(text.encode()) > 64
        status, out, _ = await post(url, {"model": MODEL, "prompt": text, "max_tokens": 4})
        assert status == 200, out  # max_model_len is counted in tokens, not bytes
        ids = tok.encode(text)
        assert eng.requests[-1].prompt_token_ids == ids and out["usage"]["prompt_tokens"] == len(ids)
        assert eng.requests[-1].block_hashes == block_hashes(ids, 4)
        assert eng.requests[-1].prompt in ("", None, text)  # the text travels with the ids (router core)
        long = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
        status, out, _ = await post(url, {"model": MODEL, "prompt": long, "max_tokens": 4})
        assert status == 400 and f"{len(tok.encode(long))} tokens" in out["error"]["message"], out
        assert out["error"]["param"] == "max_tokens", out  # the field a client can lower
        status, out, _ = await post(url, {"model": MODEL, "prompt": "x" * 5000})
        assert status == 400 and "5000 characters" in out["error"]["message"], out
        status, out, _ = await post(url, {"model": MODEL, "prompt": [1, 2, 400]})
        assert (
            status == 400
            and "prompt[2]" in out["error"]["message"]
            and "vocabulary" in out["error"]["message"]
        )
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub(r).Generate(rpb.CompletionRequest(model=MODEL, prompt_token_ids=[1, 999]))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_token_ids[1]" in (ei.value.details() or "")
        # two chats sharing a system prompt share their leading block hashes
        hashes = []
        for q in ("hi", "hello world"):
            messages = [{"role": "system", "content": kit.SYSTEM}, {"role": "user", "content": q}]
            chat = {"model": MODEL, "max_tokens": 1, "messages": messages}
            status, out, _ = await post(r.http_url + "/v1/chat/completions", chat)
            assert status == 200, out
            hashes.append(eng.requests[-1].block_hashes)
            rendered = tok.apply_chat_template(messages)  # the model's chat template, not the simple one
            assert rendered is not None and rendered.startswith(f"<s><|system|>{kit.SYSTEM}</s>")
            assert eng.requests[-1].prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
        assert len(hashes[0]) >= 4 and hashes[0][:4] == hashes[1][:4]
    finally:
        await f.close()


async def test_declared_model_without_engines_is_503_not_404() -> None:
    """A model the pool declares but no engine serves yet is unavailable (503), not unknown (404)."""
    r = RouterServer([], RouterConfig(models={MODEL}))
    await r.start("127.0.0.1", 0, 0)
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        status, out, _ = await post(r.http_url + "/v1/completions", body)
        assert status == 503 and MODEL in out["error"]["message"], out
        status, out, _ = await post(r.http_url + "/v1/completions", {**body, "model": "nope"})
        assert status == 404, out
    finally:
        await r.stop(0)


async def test_unknown_role_unknown_path_and_method_are_json_errors(fleet: Fleet) -> None:
    r = await fleet.add_router()
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}
    status, out, _ = await post(r.http_url + "/v1/chat/completions", body)
    assert status == 400 and "role" in out["error"]["message"], out
    status, out, _ = await post(r.http_url + "/v1/nope", {})
    assert status == 404 and out["error"]["code"] == 404 and out["error"]["param"] is None, out
    async with aiohttp.ClientSession() as s, s.get(r.http_url + "/v1/completions") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["type"] == "invalid_request_error"
