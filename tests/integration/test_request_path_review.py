"""Request-path review fixes, each through a real router on 127.0.0.1 over sim engines: HTTP and gRPC
give the same answers to the same bad input on every endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from corral.api.selection import ModelSelection
from corral.router.server import RouterConfig, RouterServer
from corral.router.server.limits import MAX_ERROR_CHARS, MAX_NAME_CHARS
from corral.serve.endpoint import EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

sim = pytest.importorskip("corral.serve.endpoint.sim")

MODEL = "llama-8b"
SELECTION = ModelSelection.model_validate({
    "signals": [{"name": "learn", "header": {"name": "x-corral-task", "values": ["learn"]}}],
    "rules": [{"name": "learn", "when": {"signal": "learn"}, "bandit": {"candidates": [MODEL, "sql"]}}],
    "default": MODEL,
})  # fmt: skip


@pytest.fixture
async def router() -> AsyncIterator[RouterServer]:
    eng = sim.SimEndpointEngine.create("H100", "h100-0", MODEL, time_scale=20.0, max_model_len=8192)
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
    cfg = RouterConfig(adapters={"sql": (MODEL, "file:///tmp/sql")}, selection=SELECTION, stale_after_s=0.5)
    r = RouterServer([ep.address], cfg)
    try:
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(1, timeout=10)
        yield r
    finally:
        await r.stop(0)
        await ep.stop(None)


async def test_feedback_overlong_request_id_is_a_400_on_both_fronts(router: RouterServer) -> None:
    long_id = "cmpl-" + "x" * 200_000  # far over what gRPC trailers hold
    stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(router.grpc_address))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Feedback(rpb.FeedbackRequest(request_id=long_id, score=0.5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    details = e.value.details() or ""
    assert "'request_id'" in details and str(MAX_NAME_CHARS) in details and len(details) <= MAX_ERROR_CHARS
    async with (
        aiohttp.ClientSession() as s,
        s.post(router.http_url + "/v1/feedback", json={"request_id": long_id, "score": 0.5}) as resp,
    ):
        body = await resp.json()
    assert resp.status == 400, body
    assert "'request_id'" in body["error"]["message"] and len(body["error"]["message"]) <= MAX_ERROR_CHARS


async def test_a_decision_log_that_cannot_be_written_does_not_fail_requests(router: RouterServer) -> None:
    # The decision log (and the shared feedback ledger) are bookkeeping: a full disk must not turn every
    # selected request into a 500 (it did: the write's OSError escaped Router.stream before its try).
    from corral.router.selection.log import DecisionLog

    sel = router.router.selection
    sel.log = DecisionLog("/dev/full")  # every write fails with ENOSPC, as on a full volume
    body = {"model": "auto", "prompt": "q", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(router.http_url + "/v1/completions", json=body) as resp:
            out = await resp.json()
        assert resp.status == 200, out
        assert out["model"] == MODEL
        async with s.post(router.http_url + "/v1/feedback", json={"request_id": out["id"], "score": 1}) as r:
            fb = await r.json()
        assert r.status == 200, fb  # remembered for feedback all the same


async def test_selection_counts_a_long_prompts_tokens_off_the_event_loop(tmp_path: Path) -> None:
    # A promptTokens signal (and every bandit rule's context) needs the prompt tokenized. The request path
    # tokenizes prompts over INLINE_TOKENIZE_CHARS in a worker thread; model selection did it on the event
    # loop (stalling every other request for as long as a long prompt takes), and the decision log counted
    # the tokens again there at dispatch.
    from corral.router.selection.log import DecisionLog
    from corral.router.server.core import INLINE_TOKENIZE_CHARS
    from corral.router.tokenizer import ByteTokenizer

    on_loop: list[int] = []

    class Recording(ByteTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(len(text))
            return super().encode(text, add_special_tokens)

    selection = ModelSelection.model_validate({
        "signals": [{"name": "long", "promptTokens": {"min": 1000}}],
        "rules": [{"name": "long", "when": {"signal": "long"}, "target": "sql"}],
        "default": MODEL,
    })  # fmt: skip
    eng = sim.SimEndpointEngine.create("H100", "h100-0", MODEL, time_scale=20.0, max_model_len=8192)
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
    cfg = RouterConfig(adapters={"sql": (MODEL, "file:///tmp/sql")}, selection=selection, stale_after_s=0.5,
                       tokenizers={MODEL: Recording(4)})  # fmt: skip
    r = RouterServer([ep.address], cfg)
    try:
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(1, timeout=10)
        r.router.selection.log = DecisionLog(tmp_path / "log.jsonl")
        prompt = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1000)  # ~5k tokens: fits the model
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                r.http_url + "/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 2}
            ) as resp,
        ):
            out = await resp.json()
        assert resp.status == 200, out
        assert out["model"] == "sql"  # the signal saw the count
        assert [n for n in on_loop if n > INLINE_TOKENIZE_CHARS] == []
        (line,) = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert line["prompt_tokens"] == len(prompt) // 4
    finally:
        await r.stop(0)
        await ep.stop(None)


async def test_a_selected_request_refused_by_admission_is_not_logged_as_sent(
    router: RouterServer, tmp_path: Path
) -> None:
    # The decision log (what corral replay scores) and the feedback ledger are for requests sent to an
    # engine: one refused by admission control (429) was in both.
    from corral.api.admission import AdmissionSpec
    from corral.router.selection.log import DecisionLog

    r = router.router
    r.admission.configure(AdmissionSpec.model_validate({"defaultTenant": {"requestsPerSecond": 0.01}}))
    r.selection.log = DecisionLog(tmp_path / "log.jsonl")
    body = {"model": "auto", "prompt": "q", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(router.http_url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
        async with s.post(router.http_url + "/v1/completions", json=body) as resp:
            assert resp.status == 429, await resp.text()
    refused = [x for x in r.explains.values() if x.decision is None]
    assert len(refused) == 1  # Explain keeps it (with no decision) ...
    assert refused[0].request_id not in r.selection.ledger.items  # ... feedback does not
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["request_id"] != refused[0].request_id


async def test_feedback_reads_peers_ledgers_off_the_event_loop(tmp_path: Path) -> None:
    # With a shared state folder, feedback for an id this router does not know reads every peer's ledger
    # file (up to two capacities of lines each), and every feedback reads their done files: in a worker
    # thread, not on the event loop (any client could stall the router with unknown ids).
    from corral.router.selection.shared import SharedLedger

    eng = sim.SimEndpointEngine.create("H100", "h100-0", MODEL, time_scale=20.0, max_model_len=8192)
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
    routers = []
    for rid in ("ra", "rb"):
        cfg = RouterConfig(adapters={"sql": (MODEL, "file:///tmp/sql")}, selection=SELECTION, router_id=rid,
                           selection_state_dir=str(tmp_path), stale_after_s=0.5)  # fmt: skip
        routers.append(RouterServer([ep.address], cfg))
    on_loop: list[str] = []
    real_find = SharedLedger._find

    def spy(paths: list[Path], needle: str) -> str | None:
        if threading.current_thread() is threading.main_thread():
            on_loop.append(needle)
        return real_find(paths, needle)

    a, b = routers
    try:
        for r in routers:
            await r.start("127.0.0.1", 0, 0)
            await r.wait_for_replicas(1, timeout=10)
        body = {"model": "auto", "prompt": "q", "max_tokens": 2}
        async with aiohttp.ClientSession() as s:
            hdrs = {"x-corral-task": "learn"}
            async with s.post(a.http_url + "/v1/completions", json=body, headers=hdrs) as rsp:
                out = await rsp.json()
            assert rsp.status == 200, out
            SharedLedger._find = staticmethod(spy)  # type: ignore[method-assign]
            async with s.post(b.http_url + "/v1/feedback", json={"request_id": out["id"], "score": 1}) as rsp:
                fb = await rsp.json()
            assert (rsp.status, fb["learned"]) == (200, True), fb  # found in a's ledger
            nope = {"request_id": "cmpl-nope", "score": 1}
            async with s.post(b.http_url + "/v1/feedback", json=nope) as rsp:
                assert rsp.status == 404
        stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(a.grpc_address))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Feedback(rpb.FeedbackRequest(request_id=out["id"], score=0.5))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS  # b took it: a reads b's done file
        assert on_loop == []
    finally:
        SharedLedger._find = staticmethod(real_find)  # type: ignore[method-assign]
        for r in routers:
            await r.stop(0)
        await ep.stop(None)


async def test_a_replica_that_leaves_takes_its_metric_series_with_it() -> None:
    # Replica ids are pod names: every rollout brings new ones. The router kept each departed replica's
    # decision counters (and adapter-load counters) forever, so /metrics and the router's memory grew
    # with every replica it had ever seen.
    eps = []
    for i in range(2):
        eng = sim.SimEndpointEngine.create("H100", f"h100-{i}", MODEL, time_scale=20.0, max_model_len=8192)
        eps.append(await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05))
    r = RouterServer([e.address for e in eps], RouterConfig(stale_after_s=0.5))
    try:
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(2, timeout=10)
        async with aiohttp.ClientSession() as s:
            for i in range(8):
                body = {"model": MODEL, "prompt": f"prompt {i} " * 20, "max_tokens": 2}
                async with s.post(r.http_url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
        m = r.router.metrics
        seen = {k[1] for k in m.decisions}
        assert seen, m.decisions
        gone = sorted(seen)[0]
        ep = next(e for e in eps if e.engine.info.replica_id == gone)
        await ep.stop(None)
        eps.remove(ep)
        async with asyncio.timeout(10):  # the router sees it leave
            while gone in r.router.fleet.replicas:
                await asyncio.sleep(0.05)
        assert all(k[1] != gone for k in m.decisions)
        assert f'replica="{gone}"' not in m.render().decode()
    finally:
        await r.stop(0)
        for e in eps:
            await e.stop(None)


async def test_an_explain_dry_run_does_not_feed_the_adapter_pagers_forecast(router: RouterServer) -> None:
    # The bandit's demand forecast tells the adapter pager what to prefetch: for requests sent, not for
    # Explain dry runs (which are neither logged nor open to feedback either).
    forecast: list[tuple[str, float]] = []
    router.router.selection.on_forecast = lambda arm, share: forecast.append((arm, share))
    stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(router.grpc_address))
    req = rpb.CompletionRequest(model="auto", prompt="q", max_tokens=2)
    dry = await stub.Explain(rpb.ExplainRequest(request=req), metadata=(("x-corral-task", "learn"),))
    assert dry.dry_run and dry.selection.rule == "learn"
    assert forecast == []
    resp = await stub.Generate(req, metadata=(("x-corral-task", "learn"),))
    assert [a for a, _ in forecast] == [next(a for a in (MODEL, "sql") if a != resp.model)]


async def test_an_overlong_client_request_id_is_refused_on_both_fronts(router: RouterServer) -> None:
    # limits.MAX_NAME_CHARS caps a client's request id on both fronts: gRPC's request_id field was
    # checked, HTTP's x-request-id header was not.
    long_id = "c" * (MAX_NAME_CHARS + 1)
    stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(router.grpc_address))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(rpb.CompletionRequest(model=MODEL, prompt="q", max_tokens=2, request_id=long_id))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in (e.value.details() or "")
    body = {"model": MODEL, "prompt": "q", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            router.http_url + "/v1/completions", json=body, headers={"x-request-id": long_id}
        ) as r:
            out = await r.json()
        assert r.status == 400 and "x-request-id" in out["error"]["message"], out
        ok = "c" * MAX_NAME_CHARS
        async with s.post(router.http_url + "/v1/completions", json=body, headers={"x-request-id": ok}) as r:
            assert r.status == 200 and r.headers["x-request-id"] == ok


def _largest_str(root: object) -> int:
    """The longest string reachable from ``root`` (objects followed with gc.get_referents)."""
    import gc

    seen: set[int] = set()
    todo, best = [root], 0
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        if isinstance(o, str):
            best = max(best, len(o))
            continue
        todo.extend(gc.get_referents(o))
    return best


async def test_explain_history_does_not_keep_selected_requests_prompts(router: RouterServer) -> None:
    # Explain keeps the last explain_history (2048) decisions; a selected request's record held its
    # selection, which held what the signals read: the whole prompt text (up to the router's 32 Mi
    # characters per request, for each of 2048 records).
    prompt = "word " * 6000  # 30k characters
    body = {"model": "auto", "prompt": prompt, "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(router.http_url + "/v1/completions", json=body) as resp:
            out = await resp.json()
        assert resp.status == 200, out
        async with s.get(f"{router.http_url}/v1/explain/{out['id']}") as resp:
            ex = await resp.json()
    assert ex["selection"]["rule"] == "(default)"  # Explain still shows the selection
    assert _largest_str(router.router.explains[out["id"]]) < 1000


async def test_an_unexpected_error_in_feedback_is_internal_on_grpc_as_500_on_http(tmp_path: Path) -> None:
    # The gRPC front's contract (grpc_api docstring): INTERNAL for anything unexpected, as HTTP's 500.
    # Generate kept it; Feedback (and Explain) let the exception out: UNKNOWN, 'Unexpected <class ...>'.
    eng = sim.SimEndpointEngine.create("H100", "h100-0", MODEL, time_scale=20.0, max_model_len=8192)
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
    cfg = RouterConfig(adapters={"sql": (MODEL, "file:///tmp/sql")}, selection=SELECTION, router_id="ra",
                       selection_state_dir=str(tmp_path), stale_after_s=0.5)  # fmt: skip
    r = RouterServer([ep.address], cfg)
    try:
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(1, timeout=10)
        stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))
        ids = []
        for _ in range(2):
            resp = await stub.Generate(rpb.CompletionRequest(model="auto", prompt="q", max_tokens=2))
            ids.append(resp.request_id)
        r.router.selection.store.shared.done._f.close()  # a broken ledger file: a bug's stand-in
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Feedback(rpb.FeedbackRequest(request_id=ids[0], score=0.5))
        assert e.value.code() == grpc.StatusCode.INTERNAL, e.value
        assert "internal error" in (e.value.details() or "")
        async with (
            aiohttp.ClientSession() as s,
            s.post(r.http_url + "/v1/feedback", json={"request_id": ids[1], "score": 0.5}) as resp2,
        ):
            assert resp2.status == 500
    finally:
        await r.stop(0)
        await ep.stop(None)
