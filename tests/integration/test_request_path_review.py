"""Request-path review fixes, each through a real router on 127.0.0.1 over sim engines: HTTP and gRPC
give the same answers to the same bad input on every endpoint."""

from __future__ import annotations

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
