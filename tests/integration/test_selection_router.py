"""Model selection through real routers (issue 15): sim engines behind gRPC endpoints and Corral routers on
127.0.0.1. A request naming the selection model gets its model chosen by the policy's rules (the response's
``model`` says which), Explain shows the signals, the rule and the bandit's scores (HTTP and gRPC), feedback
over HTTP and gRPC teaches the bandit (404 / NOT_FOUND for unknown ids), and the bandit's state survives a
router restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from corral.api.selection import ModelSelection
from corral.router.server import RouterConfig, RouterServer
from corral.serve.endpoint import EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

sim = pytest.importorskip("corral.serve.endpoint.sim")

MODEL = "llama-8b"
SELECTION = ModelSelection.model_validate({
    "signals": [
        {"name": "sql-task", "header": {"name": "x-corral-task", "values": ["sql"]}},
        {"name": "learn", "header": {"name": "x-corral-task", "values": ["learn"]}},
        {"name": "code", "keywords": ["def ", "import "]},
    ],
    "rules": [
        {"name": "sql", "priority": 20, "when": {"signal": "sql-task"}, "target": "sql",
         "sampling": {"temperature": 0.0, "maxTokens": 3}},
        {"name": "learn", "priority": 10, "when": {"signal": "learn"},
         "bandit": {"candidates": [MODEL, "sql"], "alpha": 0.5, "costWeight": 0.1}},
        {"name": "code", "when": {"signal": "code"}, "target": "sql"},
    ],
    "default": MODEL,
})  # fmt: skip


async def start_router(addresses: list[str], state: Path, router_id: str = "r1", **kw: Any) -> RouterServer:
    cfg = RouterConfig(**kw,adapters={"sql": (MODEL, "file:///tmp/sql")}, selection=SELECTION,
                       selection_state_dir=str(state), router_id=router_id, stale_after_s=0.5)  # fmt: skip
    r = RouterServer(addresses, cfg)
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(len(addresses), timeout=10)
    return r


@pytest.fixture
async def engines() -> AsyncIterator[list[str]]:
    eps: list[EngineEndpoint] = []
    for i, prof in enumerate(["H100", "A100-80GB"]):
        eng = sim.SimEndpointEngine.create(
            prof, f"{prof.lower()}-{i}", MODEL, time_scale=20.0, max_model_len=8192
        )
        eps.append(await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05))
    try:
        yield [e.address for e in eps]
    finally:
        for e in eps:
            await e.stop(None)


async def call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text)


async def test_http_selection_explain_and_feedback(engines: list[str], tmp_path: Path) -> None:
    r = await start_router(engines, tmp_path)
    try:
        url = r.http_url
        st, out = await call("POST", url + "/v1/completions", {"model": "auto", "prompt": "top customers",
                             "max_tokens": 8}, {"x-corral-task": "sql"})  # fmt: skip
        assert st == 200, out
        assert out["model"] == "sql" and out["usage"]["completion_tokens"] == 3  # the rule's maxTokens cap
        st, ex = await call("GET", f"{url}/v1/explain/{out['id']}")
        assert st == 200, ex
        assert ex["selection"]["rule"] == "sql"
        assert ex["selection"]["sampling"] == {"temperature": 0.0, "maxTokens": 3}
        assert ex["selection"]["signals"] == {"sql-task": {"value": "sql", "matched": True}}
        assert ex["replica_id"] in {c["replica_id"] for c in ex["candidates"]}
        # chat: the keywords signal reads the messages; the default when nothing matches
        chat = {"model": "auto", "messages": [{"role": "user", "content": "import os"}]}
        st, out = await call("POST", url + "/v1/chat/completions", chat)
        assert (st, out["model"]) == (200, "sql")
        st, out = await call("POST", url + "/v1/completions", {"model": "auto", "prompt": "hello there"})
        assert (st, out["model"]) == (200, MODEL)
        st, ex = await call("GET", f"{url}/v1/explain/{out['id']}")
        assert ex["selection"]["rule"] == "(default)"
        async with aiohttp.ClientSession() as sess, sess.get(url + "/v1/models") as resp:
            cards = {m["id"]: m for m in (await resp.json())["data"]}
        assert cards["auto"]["selection"] is True and cards["auto"]["replicas"] == 2
        # a concrete model is not selected
        st, out = await call("POST", url + "/v1/completions", {"model": MODEL, "prompt": "import os"})
        assert (st, out["model"]) == (200, MODEL)
        # the bandit rule, then feedback
        forecast: list[tuple[str, float]] = []
        r.router.selection.on_forecast = lambda arm, share: forecast.append((arm, share))  # the pager's hook
        body = {"model": "auto", "prompt": "q", "max_tokens": 2}
        st, out = await call("POST", url + "/v1/completions", body, {"x-corral-task": "learn"})
        assert st == 200 and out["model"] in (MODEL, "sql")
        other = "sql" if out["model"] == MODEL else MODEL
        assert [a for a, _ in forecast] == [other] and 0 < forecast[0][1] <= 1
        st, ex = await call("GET", f"{url}/v1/explain/{out['id']}")
        scores = ex["selection"]["bandit"]["scores"]
        assert {s["arm"] for s in scores} == {MODEL, "sql"} and all(s["cost"] > 0 for s in scores)
        st, fb = await call("POST", url + "/v1/feedback", {"request_id": out["id"], "score": 1.0})
        assert (st, fb) == (
            200,
            {"request_id": out["id"], "model": out["model"], "rule": "learn", "learned": True},
        )
        st, fb = await call("POST", url + "/v1/feedback", {"request_id": out["id"], "score": 1.0})
        assert st == 409 and "already given" in fb["error"]["message"]
        st, fb = await call("POST", url + "/v1/feedback", {"request_id": "cmpl-nope", "score": 1.0})
        assert st == 404 and "unknown request id 'cmpl-nope'" in fb["error"]["message"]
        st, fb = await call("POST", url + "/v1/feedback", {"request_id": out["id"], "score": 7})
        assert st == 400 and "'score'" in fb["error"]["message"]
        st, fb = await call("POST", url + "/v1/feedback", {"score": 1})
        assert st == 400 and "'request_id'" in fb["error"]["message"]
    finally:
        await r.stop(0)


async def test_grpc_feedback_and_restart_persistence(engines: list[str], tmp_path: Path) -> None:
    r = await start_router(engines, tmp_path)
    learnt = 0
    try:
        stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))
        for _ in range(3):
            resp = await stub.Generate(rpb.CompletionRequest(model="auto", prompt="q", max_tokens=2),
                                       metadata=(("x-corral-task", "learn"),))  # fmt: skip
            assert resp.model in (MODEL, "sql")
            ex = await stub.Explain(rpb.ExplainRequest(request_id=resp.request_id))
            assert ex.selection.rule == "learn" and ex.selection.algorithm == "linucb"
            assert {s.arm for s in ex.selection.scores} == {MODEL, "sql"}
            assert ex.selection.matched["learn"] and ex.selection.signals["learn"] == "learn"
            fb = await stub.Feedback(rpb.FeedbackRequest(request_id=resp.request_id, score=0.9))
            assert fb.learned and fb.model == resp.model
            learnt += 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Feedback(rpb.FeedbackRequest(request_id="cmpl-unknown", score=0.5))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown request id" in (
            e.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Feedback(rpb.FeedbackRequest(request_id=resp.request_id, score=0.5))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await r.stop(0)
    assert (tmp_path / "r1.json").exists()
    again = await start_router(engines, tmp_path)  # a restart: same id, same state folder
    try:
        store = again.router.selection.store
        n = sum(store.totals(f"learn\x1f{arm}", 3)[2] for arm in (MODEL, "sql"))  # bias, length, learn
        assert n == learnt
    finally:
        await again.stop(0)


async def test_span_attributes_and_explain_cli(
    engines: list[str], tmp_path: Path, spans: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from corral.api.cli import main

    r = await start_router(engines, tmp_path)
    try:
        body = {"model": "auto", "prompt": "q", "max_tokens": 2}
        hdrs = {"x-corral-task": "learn", "authorization": "Bearer secret-key"}
        st, out = await call("POST", r.http_url + "/v1/completions", body, hdrs)
        assert st == 200, out
        route = [s for s in spans.get_finished_spans() if s.attributes.get("corral.request_id") == out["id"]]
        assert len(route) == 1
        attrs = dict(route[0].attributes)
        assert attrs["corral.select.model"] == out["model"] and attrs["corral.select.rule"] == "learn"
        assert attrs["corral.select.signal.learn"] == "learn" and attrs["corral.select.matched.learn"] is True
        assert {f"corral.select.bandit.{a}.score" for a in (MODEL, "sql")} <= set(attrs)
        assert "secret-key" not in repr(attrs)  # credentials never reach header signals
        rc = await asyncio.to_thread(main, ["explain", "--router", r.grpc_address, "--request-id", out["id"]])
        text = capsys.readouterr().out
        assert rc == 0, text
        assert f"selection: {out['model']} (rule learn" in text and "bandit linucb" in text
    finally:
        await r.stop(0)


POLICY_B = """
apiVersion: corral.dev/v1alpha1
kind: RoutingPolicy
metadata: {name: b}
spec:
  poolRef: p
  modelSelection:
    signals:
      - {name: code, keywords: ["import "]}
    rules:
      - {name: code, when: {signal: code}, target: sql}
    default: llama-8b
"""


async def test_decision_log_and_replay(
    engines: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from corral.api.cli import main

    log = tmp_path / "decisions.jsonl"
    r = await start_router(engines, tmp_path, selection_log=str(log))
    try:
        url = r.http_url + "/v1/completions"
        ids = []
        for prompt, task in (("top customers", "sql"), ("import os", None), ("hello", None), ("q", "learn")):
            hdrs = {"x-corral-task": task} if task else {}
            st, out = await call("POST", url, {"model": "auto", "prompt": prompt, "max_tokens": 2}, hdrs)
            assert st == 200, out
            ids.append((out["id"], out["model"]))
        st, _ = await call("POST", r.http_url + "/v1/feedback", {"request_id": ids[0][0], "score": 0.25})
        assert st == 200
    finally:
        await r.stop(0)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["decision"] * 4 + ["feedback"]
    assert lines[0]["headers"] == {"x-corral-task": "sql"} and lines[0]["text"] == "top customers"
    policy = tmp_path / "b.yaml"
    policy.write_text(POLICY_B)
    rc = await asyncio.to_thread(main, ["replay", str(policy), "--log", str(log), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads(out)
    # A: sql -> sql, code -> sql, default -> llama-8b, bandit -> either; B: sql task -> default llama-8b
    assert rep["decisions"] == 4 and rep["rules_b"]["code"] == 1
    assert rep["changes"].get("sql -> llama-8b", 0) >= 1
    assert rep["feedback"]["scored"] == 1 and rep["feedback"]["mean_score_a"] == 0.25
    assert rep["feedback"]["matched_b"] == 0  # B would not have sent the scored request where A did
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "decision"}\nnot json\n')
    assert await asyncio.to_thread(main, ["replay", str(policy), "--log", str(bad)]) == 1
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err  # the whole log is read before replaying
    bad.write_text('{"type": "decision"}\n')
    assert await asyncio.to_thread(main, ["replay", str(policy), "--log", str(bad)]) == 1
    assert "bad.jsonl:1: bad decision record" in capsys.readouterr().err


async def test_feedback_for_another_tenants_request_is_not_found(engines: list[str], tmp_path: Path) -> None:
    from corral.router.server.auth import KeyStore

    r = await start_router(engines, tmp_path, api_keys=KeyStore.from_keys({"key-a": "acme", "key-b": "bob"}))
    try:
        a = {"authorization": "Bearer key-a"}
        b = {"authorization": "Bearer key-b"}
        body = {"model": "auto", "prompt": "q", "max_tokens": 2}
        st, out = await call("POST", r.http_url + "/v1/completions", body, {**a, "x-corral-task": "learn"})
        assert st == 200, out
        st, fb = await call("POST", r.http_url + "/v1/feedback", {"request_id": out["id"], "score": 1.0}, b)
        assert st == 404 and f"unknown request id '{out['id']}'" in fb["error"]["message"]  # as if unknown
        st, fb = await call("POST", r.http_url + "/v1/feedback", {"request_id": out["id"], "score": 1.0})
        assert st == 401  # no key at all
        st, fb = await call("POST", r.http_url + "/v1/feedback", {"request_id": out["id"], "score": 1.0}, a)
        assert st == 200 and fb["learned"] is True
        st, ex = await call("GET", f"{r.http_url}/v1/explain/{out['id']}", headers=a)
        assert st == 403 and "role 'admin'" in ex["error"]["message"]  # Explain is for admins, as over gRPC
    finally:
        await r.stop(0)


async def test_active_active_routers_share_feedback_and_state(engines: list[str], tmp_path: Path) -> None:
    a = await start_router(engines, tmp_path, router_id="ra")
    b = await start_router(engines, tmp_path, router_id="rb")
    try:
        body = {"model": "auto", "prompt": "q", "max_tokens": 2}
        st, out = await call("POST", a.http_url + "/v1/completions", body, {"x-corral-task": "learn"})
        assert st == 200, out
        # the load balancer sends the feedback to the other router
        st, fb = await call("POST", b.http_url + "/v1/feedback", {"request_id": out["id"], "score": 1.0})
        assert (st, fb["learned"], fb["model"]) == (200, True, out["model"])
        st, fb = await call("POST", a.http_url + "/v1/feedback", {"request_id": out["id"], "score": 1.0})
        assert st == 409
        b.router.selection.store.flush()
        store = a.router.selection.store
        store.sync(force=True)
        assert store.totals(f"learn\x1f{out['model']}", 3)[2] == 1  # B's reward is in A's bandit
    finally:
        await a.stop(0)
        await b.stop(0)


async def test_shadow_mode_logs_and_explains_the_shadow_policy(engines: list[str], tmp_path: Path) -> None:
    from corral.router.server.__main__ import _shadow

    policy = tmp_path / "b.yaml"
    policy.write_text(POLICY_B)
    log = tmp_path / "log.jsonl"
    r = await start_router(engines, tmp_path, selection_log=str(log), shadow_selection=_shadow(str(policy)))
    try:
        body = {"model": "auto", "prompt": "top customers", "max_tokens": 2}
        st, out = await call("POST", r.http_url + "/v1/completions", body, {"x-corral-task": "sql"})
        assert (st, out["model"]) == (200, "sql")  # the live policy routes
        st, ex = await call("GET", f"{r.http_url}/v1/explain/{out['id']}")
        assert ex["selection"]["shadow"] == {"model": "llama-8b", "rule": "(default)"}  # B: no sql rule
        # an Explain dry run is neither logged nor open to feedback
        stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))
        dry = await stub.Explain(rpb.ExplainRequest(request=rpb.CompletionRequest(model="auto", prompt="q")))
        assert dry.dry_run and dry.selection.model == "llama-8b"
        st, fb = await call("POST", r.http_url + "/v1/feedback", {"request_id": dry.request_id, "score": 1.0})
        assert st == 404 and "unknown request id" in fb["error"]["message"]
    finally:
        await r.stop(0)
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["model"] == "sql" and line["shadow"] == {"model": "llama-8b", "rule": "(default)"}
