"""Tenants end to end on 127.0.0.1 (a real router, sim engines behind gRPC): hashed API keys from a file,
reloaded without a restart; admin endpoints (Explain, /metrics) refused to inference keys; tenant model
allow-lists and private adapters; cache isolation proven with Explain and the engines' cached-token counts;
and no key, prompt or adapter secret in logs, trace spans or metrics."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from corral.router.server import RouterConfig, RouterServer, load_api_keys
from corral.router.server.auth import append_key, hash_key
from corral.serve.endpoint import EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

sim = pytest.importorskip("corral.serve.endpoint.sim")

MODEL = "llama-8b"
KA, KA_ADMIN, KB, KOPS = "sk-alpha-9c1e2f", "sk-alpha-admin-77d0", "sk-bravo-51aa", "sk-ops-e3b9"
PRIVATE, SHARED = "acme-lora", "shared-lora"
SECRET_SOURCE = "file:///adapters/acme?token=ADAPTER-SECRET-5d41"
PREFIX = "Shared system prompt for every tenant of the Corral project. " * 40  # ~150 blocks


def key_text(with_ka: bool = True) -> str:
    ka = f'  - {{tenant: tenant-a, key: "{hash_key(KA)}"}}\n' if with_ka else ""
    return f"""\
keys:
{ka}  - {{tenant: tenant-a, key: "{hash_key(KA_ADMIN)}", role: admin}}
  - {{tenant: tenant-b, key: "{hash_key(KB)}"}}
  - {{tenant: ops, key: "{hash_key(KOPS)}", role: admin}}
tenants:
  tenant-b:
    models: [{MODEL}]
"""


def key_file(path: Path) -> Path:
    path.write_text(key_text())
    return path


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.keys = key_file(tmp / "keys.yaml")
        self.endpoints: list[EngineEndpoint] = []
        self.routers: list[RouterServer] = []

    async def start(self) -> None:
        for i in range(2):
            eng = sim.SimEndpointEngine.create(
                "H100", f"h100-{i}", MODEL, time_scale=20.0, max_model_len=8192
            )
            self.endpoints.append(await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05))

    async def router(self, isolate: bool = True) -> RouterServer:
        cfg = RouterConfig(
            stale_after_s=1.0,
            api_keys=load_api_keys(self.keys, poll_s=0.0),
            isolate_tenants=isolate,
            adapters={PRIVATE: (MODEL, SECRET_SOURCE), SHARED: (MODEL, "file:///adapters/shared")},
            adapter_owners={PRIVATE: "tenant-a"},
        )
        r = RouterServer([e.address for e in self.endpoints], cfg)
        await r.start("127.0.0.1", 0, 0)
        await r.wait_for_replicas(len(self.endpoints), timeout=10)
        self.routers.append(r)
        return r

    async def close(self) -> None:
        for r in self.routers:
            await r.stop(0)
        for e in self.endpoints:
            await e.stop(None)
            close = getattr(e.engine, "close", None)
            if close is not None:
                await close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def post(r: RouterServer, body: Any, key: str | None, path: str = "/v1/completions") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(r.http_url + path, json=body, headers=auth(key)) as resp:
        return resp.status, json.loads(await resp.text())


async def status_of(r: RouterServer, body: Any, key: str, want: int) -> bool:
    return (await post(r, body, key))[0] == want


async def get(r: RouterServer, path: str, key: str | None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(r.http_url + path, headers=auth(key)) as resp:
        return resp.status, await resp.text()


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def model_ids(r: RouterServer, key: str) -> set[str]:
    status, text = await get(r, "/v1/models", key)
    assert status == 200, text
    return {m["id"] for m in json.loads(text)["data"]}


# ---- keys, roles, allow-lists, private adapters ------------------------------------------------------------
async def test_roles_allow_lists_and_private_adapters(stack: Stack) -> None:
    r = await stack.router()
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    assert (await post(r, body, None))[0] == 401
    assert (await post(r, body, "sk-not-a-key"))[0] == 401
    assert (await post(r, body, KA))[0] == 200
    # a private adapter: listed and usable for its tenant only; for others it does not exist
    assert {MODEL, PRIVATE, SHARED} <= await model_ids(r, KA)
    assert await model_ids(r, KB) == {MODEL}  # tenant-b may use the base model only
    assert PRIVATE not in await model_ids(r, KOPS) and SHARED in await model_ids(r, KOPS)
    status, out = await post(r, {**body, "model": PRIVATE}, KA)
    assert status == 200, out
    for key in (KB, KOPS):
        status, out = await post(r, {**body, "model": PRIVATE}, key)
        assert status == 404 and out["error"]["message"].startswith(f"model '{PRIVATE}' not found"), out
        assert PRIVATE not in out["error"]["message"].partition("available:")[2]
    status, out = await post(r, {**body, "model": SHARED}, KB)
    assert status == 403 and f"tenant 'tenant-b' may not use model '{SHARED}'" in out["error"]["message"]
    st = rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await st.Generate(rpb.CompletionRequest(model=PRIVATE, prompt="x", max_tokens=2), metadata=md(KB))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await st.Generate(rpb.CompletionRequest(model=SHARED, prompt="x", max_tokens=2), metadata=md(KB))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await st.ListModels(rpb.ListModelsRequest(), metadata=md(KB))
    assert {m.id for m in listed.models} == {MODEL}

    # admin endpoints: /metrics and Explain need role admin
    status, text = await get(r, "/metrics", KA)
    assert status == 403 and "role 'admin'" in json.loads(text)["error"]["message"]
    assert (await get(r, "/metrics", None))[0] == 401
    status, text = await get(r, "/metrics", KOPS)
    assert status == 200 and "corral_requests" in text
    assert (await get(r, "/health", None))[0] == 200  # liveness stays open
    dry = rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt="hello"))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await st.Explain(dry, metadata=md(KA))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in (ei.value.details() or "")
    assert (await st.Explain(dry, metadata=md(KOPS))).replica_id.startswith("h100-")


async def test_keys_reload_without_restart(stack: Stack) -> None:
    r = await stack.router()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    new = append_key(stack.keys, "tenant-c")  # written atomically, as a Secret update swaps the file
    await wait_until(lambda: status_of(r, body, new, 200), what="the new key to work")
    # revoke tenant-a's inference key (a new version of the file without it, and without tenant-c)
    text = key_text(with_ka=False)
    tmp = stack.keys.with_name("keys.new")
    tmp.write_text(text)
    os.replace(tmp, stack.keys)
    await wait_until(lambda: status_of(r, body, KA, 401), what="the revoked key to be refused")
    status, out = await post(r, body, KA)
    assert status == 401 and out["error"]["message"] == "invalid API key"
    assert (await post(r, body, KB))[0] == 200
    assert (await post(r, body, new))[0] == 401
    # a broken version keeps the keys in force and reports its line
    stack.keys.write_text(text + "  - {tenant: x, key: sk-plain}\n")
    store = r.router.config.api_keys
    assert store is not None

    async def bad_version_seen() -> bool:
        return await status_of(r, body, KB, 200) and store.last_error is not None

    await wait_until(bad_version_seen, what="the bad version seen")
    assert store.last_error is not None and "keys.yaml:" in store.last_error
    assert (await post(r, body, KB))[0] == 200
    status, metrics = await get(r, "/metrics", KOPS)  # what an alert watches
    assert status == 200
    assert "corral_api_key_file_refused 1.0" in metrics and "corral_api_keys_enabled 1.0" in metrics
    assert "corral_api_keys 3.0" in metrics and "corral_api_key_reloads_total 2.0" in metrics  # KA revoked


# ---- cache isolation ----------------------------------------------------------------------------------
async def explain_id(st: rpb_grpc.RouterStub, request_id: str) -> rpb.ExplainResponse:
    return await st.Explain(rpb.ExplainRequest(request_id=request_id), metadata=md(KOPS))


async def test_isolated_tenants_never_share_prefix_affinity(stack: Stack) -> None:
    iso = await stack.router(isolate=True)
    shared = await stack.router(isolate=False)
    st_iso = rpb_grpc.RouterStub(grpc.aio.insecure_channel(iso.grpc_address))
    st_shared = rpb_grpc.RouterStub(grpc.aio.insecure_channel(shared.grpc_address))

    async def cached_for(st: rpb_grpc.RouterStub, admin_key: str, prompt: str) -> int:
        dry = rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=prompt))
        return (await st.Explain(dry, metadata=md(admin_key))).cached_blocks

    for st, router, prompt in ((st_iso, iso, PREFIX + "iso"), (st_shared, shared, PREFIX + "shared")):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        assert (await post(router, body, KA))[0] == 200
        # tenant-a's blocks reach the router's index through the engines' KV events (tenant-a's admin key)
        await wait_until(
            lambda st=st, prompt=prompt: cached_for(st, KA_ADMIN, prompt), what="tenant-a's blocks"
        )

    # isolated: tenant-b's identical prompt gets no affinity anywhere, and the engine reuses no KV
    status, out = await post(iso, {"model": MODEL, "prompt": PREFIX + "iso", "max_tokens": 2}, KB)
    assert status == 200
    ex = await explain_id(st_iso, out["id"])
    assert ex.cached_blocks == 0 and all(c.cached_blocks == 0 for c in ex.candidates), ex
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert await cached_for(st_iso, KOPS, PREFIX + "iso") == 0  # nor does the ops tenant
    # tenant-a itself does get its own prefix back
    status, out = await post(iso, {"model": MODEL, "prompt": PREFIX + "iso", "max_tokens": 2}, KA)
    ex = await explain_id(st_iso, out["id"])
    assert ex.cached_blocks > 0 and out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    # not isolated: tenant-b lands on tenant-a's cached prefix
    status, out = await post(shared, {"model": MODEL, "prompt": PREFIX + "shared", "max_tokens": 2}, KB)
    ex = await explain_id(st_shared, out["id"])
    assert ex.cached_blocks > 0 and out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# ---- nothing secret in logs, traces or metrics ----------------------------------------------------------
async def test_no_key_prompt_or_adapter_secret_in_logs_spans_or_metrics(
    stack: Stack, spans: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await stack.router()
    canary = "PROMPT-CANARY-c0ffee"
    bad_key = "sk-wrong-KEY-CANARY-1234"
    prompt = f"{PREFIX} {canary} please answer"
    st = rpb_grpc.RouterStub(grpc.aio.insecure_channel(r.grpc_address))
    for model in (MODEL, PRIVATE):
        assert (await post(r, {"model": model, "prompt": prompt, "max_tokens": 3}, KA))[0] == 200
    async with aiohttp.ClientSession() as s:
        body = {
            "model": PRIVATE,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "max_tokens": 3,
        }
        async with s.post(r.http_url + "/v1/chat/completions", json=body, headers=auth(KA)) as resp:
            assert resp.status == 200 and b"[DONE]" in await resp.read()
    await st.Generate(rpb.CompletionRequest(model=PRIVATE, prompt=prompt, max_tokens=3), metadata=md(KA))
    async for _ in st.GenerateStream(
        rpb.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=3), metadata=md(KA)
    ):
        pass
    await st.Explain(
        rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=prompt)), metadata=md(KOPS)
    )
    # refusals: a wrong key, another tenant's private adapter, a model outside the allow-list
    assert (await post(r, {"model": MODEL, "prompt": prompt}, bad_key))[0] == 401
    assert (await post(r, {"model": PRIVATE, "prompt": prompt}, KB))[0] == 404
    assert (await post(r, {"model": SHARED, "prompt": prompt}, KB))[0] == 403
    with pytest.raises(grpc.aio.AioRpcError):
        await st.Generate(rpb.CompletionRequest(model=MODEL, prompt=prompt), metadata=md(bad_key))
    status, metrics = await get(r, "/metrics", KOPS)
    assert status == 200

    exported = spans.get_finished_spans()
    assert exported, "the router exported no spans"
    span_text = "\n".join(
        json.dumps(
            {
                "name": sp.name,
                "attributes": dict(sp.attributes or {}),
                "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in sp.events],
                "status": str(sp.status.description),
            },
            default=str,
        )
        for sp in exported
    )
    records = "\n".join(f"{rec.getMessage()} {rec.exc_text or ''}" for rec in caplog.records)
    secrets = [KA, KB, KOPS, KA_ADMIN, bad_key, canary, "ADAPTER-SECRET-5d41", hash_key(KA), hash_key(KB)]
    for where, text in (("logs", records), ("spans", span_text), ("metrics", metrics)):
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {where}"
    assert "corral.route" in span_text and "corral_requests" in metrics  # the channels were really captured
