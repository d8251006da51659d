"""The router in front of OpenAI-compatible servers: fake vLLM-shaped workers (real aiohttp servers on
127.0.0.1, :mod:`corral.serve.fakevllm`) behind a real router (``BackendPool``) and the ``corral router`` CLI.

Covers completions / chat / SSE with usage, prefix affinity seen in the workers' own cache counters, load
samples scraped from ``/metrics``, dynamic LoRA loading and residency from ``/v1/models``, error mapping and
retry, ejection of a dead backend and its re-admission, and the standalone command with the shipped
RoutingPolicy example.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from corral.router.backends.discovery import StaticBackends
from corral.router.backends.pool import BackendPool
from corral.router.server import RouterConfig, RouterServer
from corral.serve.fakevllm import FakeVllm, FakeVllmConfig
from waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "llama-8b"
ROOT = Path(__file__).resolve().parents[2]


class Setup:
    def __init__(self, workers: list[FakeVllm], server: RouterServer, http: aiohttp.ClientSession) -> None:
        self.workers, self.server, self.http = workers, server, http

    @property
    def url(self) -> str:
        return self.server.http_url

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
        async with self.http.post(self.url + path, json=body) as r:
            text = await r.text()
            try:
                data: Any = json.loads(text)
            except ValueError:
                data = text
            return r.status, data, r.headers

    def worker_of(self, replica: str) -> FakeVllm:
        return next(w for w in self.workers if w.url.endswith(replica))


async def _setup(n: int = 2, config: RouterConfig | None = None, **worker_kw: Any) -> Setup:
    cfg = FakeVllmConfig(**{"decode_s_per_token": 0.001, **worker_kw})
    workers = [FakeVllm(cfg, name=f"w{i}") for i in range(n)]
    for w in workers:
        await w.start()
    server = RouterServer(
        StaticBackends([w.url for w in workers], poll_interval_s=0.2),
        config or RouterConfig(index_mode="approximate"),
        pool_cls=BackendPool,
        scrape_interval_s=0.05,
        fail_threshold=2,
        probe_timeout_s=0.5,
    )
    await server.start()
    await server.wait_for_replicas(n, 10)
    return Setup(workers, server, aiohttp.ClientSession())


@pytest.fixture
async def fleet() -> AsyncIterator[Setup]:
    s = await _setup(2)
    yield s
    await s.http.close()
    await s.server.stop()
    for w in s.workers:
        await w.stop()


async def test_completions_chat_and_stream_with_usage_and_prefix_affinity(fleet: Setup) -> None:
    prompt = "You are a helpful SQL assistant. " * 20 + "Question 1"
    st, body, h = await fleet.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 5})
    assert st == 200, body
    assert body["choices"][0]["text"] == " t" * 5 and body["usage"]["completion_tokens"] == 5
    first = h["x-corral-replica"]
    # The same prefix goes to the same backend, where the worker's own LRU cache hits it.
    for i in range(2, 6):
        st, body, h = await fleet.post(
            "/v1/completions", {"model": MODEL, "prompt": prompt[:-1] + str(i), "max_tokens": 2}
        )
        assert st == 200 and h["x-corral-replica"] == first
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 160
    w = fleet.worker_of(first)
    assert w.counters["requests"] == 5 and w.counters["cached_tokens"] >= 4 * 160
    # SSE: tokens as they come, the usage event (cached tokens from the backend), [DONE].
    async with fleet.http.post(
        fleet.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as r:  # fmt: skip
        assert r.status == 200
        events = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " t" * 3
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    st, body, _ = await fleet.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert st == 200 and body["choices"][0]["message"]["content"] == " t t"
    # a chat goes to the backend as a chat (its own template), not as the router's rendering
    assert sum(w.counters["chat_requests"] for w in fleet.workers) == 1


async def test_load_the_router_did_not_send_comes_from_scraped_metrics(fleet: Setup) -> None:
    """Clients going straight to one backend load it; the router sees that only through /metrics and
    sends its own requests to the other one, then uses both again once that load is gone."""
    a = fleet.workers[0]
    a.cfg.prefill_base_s = 0.3  # slow prefills: the direct requests queue on a for a while
    rid_a = a.url.split("//")[1]
    fs = fleet.server.fleet
    direct = [
        asyncio.create_task(fleet.http.post(a.url + "/v1/completions",
                                            json={"model": MODEL, "prompt": f"d{i}", "max_tokens": 1}))
        for i in range(6)
    ]  # fmt: skip

    def external_on_a() -> bool:
        s = fs.replicas[rid_a].last_sample
        return s is not None and s.running + s.waiting >= 5  # none of them sent by the router

    await wait_until(external_on_a, 10, "the router's sample of a to show the direct requests")
    assert 0 <= fleet.server.router.now() - fs.replicas[rid_a].sample_received_at < 2.0  # router's clock
    for i in range(4):  # cold prompts: only load decides
        st, _, h = await fleet.post(
            "/v1/completions", {"model": MODEL, "prompt": f"r{i} " * 30, "max_tokens": 1}
        )
        assert st == 200 and h["x-corral-replica"] != rid_a, "routed onto the backend busy with others' work"
    for t in direct:
        (await t).release()

    def drained() -> bool:
        s = fs.replicas[rid_a].last_sample
        return s is not None and s.running + s.waiting == 0

    await wait_until(drained, 10, "the scraped load of a to go back to 0")


async def test_lora_loaded_on_demand_and_residency_from_v1_models() -> None:
    adapters = {"sql-coder": (MODEL, "file:///adapters/sql"), "gone": (MODEL, "file:///adapters/gone")}
    cfg = RouterConfig(index_mode="approximate", adapters=adapters)
    s = await _setup(2, cfg, lora_paths=("/adapters/sql",))  # /adapters/gone is on no backend's disk
    try:
        req = {"model": "sql-coder", "prompt": "select", "max_tokens": 2}
        st, body, h = await s.post("/v1/completions", req)
        assert st == 200, body
        rid = h["x-corral-replica"]
        w = s.worker_of(rid)
        assert w.counters["lora_loads"] == 1 and w.adapters == {"sql-coder": "/adapters/sql"}
        # residency: the backend's /v1/models lists it; the router's fleet state has it on that replica only
        r = s.server.fleet.replicas[rid]
        await wait_until(lambda: "sql-coder" in r.adapters_gpu, 5, "adapter residency")
        st, _, h2 = await s.post("/v1/completions", {**req, "prompt": "select 2"})
        assert st == 200 and h2["x-corral-replica"] == rid and w.counters["lora_loads"] == 1
        other = next(x for x in s.workers if x is not w)
        assert other.counters["lora_loads"] == 0
        # unloaded behind the router's back: residency follows /v1/models
        async with s.http.post(w.url + "/v1/unload_lora_adapter", json={"lora_name": "sql-coder"}) as u:
            assert u.status == 200
        await wait_until(lambda: "sql-coder" not in r.adapters_gpu, 5, "residency to drop the adapter")
        # an adapter nobody declared: 404 naming it
        st, body, _ = await s.post("/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 1})
        assert st == 404 and "nope" in body["error"]["message"]
        # a declared adapter no backend can load: 503 naming it and the cause; the backends stay in routing
        st, body, _ = await s.post("/v1/completions", {"model": "gone", "prompt": "x", "max_tokens": 1})
        assert st == 503, body
        assert "could not load adapter 'gone'" in body["error"]["message"], body
        assert "No adapter found for /adapters/gone" in body["error"]["message"]
        assert len(s.server.fleet.candidates(MODEL)) == 2
        st, _, _ = await s.post("/v1/completions", {"model": MODEL, "prompt": "still fine", "max_tokens": 1})
        assert st == 200
    finally:
        await s.http.close()
        await s.server.stop()
        for x in s.workers:
            await x.stop()


async def test_errors_map_and_failing_backend_is_retried_elsewhere(fleet: Setup) -> None:
    a, b = fleet.workers
    a.healthy = False  # answers 503 to completions (and /health)
    for i in range(4):
        st, body, h = await fleet.post("/v1/completions", {"model": MODEL, "prompt": f"q{i} " * 30,
                                                           "max_tokens": 1})  # fmt: skip
        assert st == 200, body
        assert b.url.endswith(h["x-corral-replica"])
    b.healthy = False
    await wait_until(lambda: not fleet.server.fleet.candidates(MODEL), 10, "both backends to be ejected")
    st, body, _ = await fleet.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert st in (404, 503), body  # no backend serves the model any more
    # A backend's own 400 reaches the client as a 400 with its message.
    a.healthy = b.healthy = True
    await fleet.server.wait_for_replicas(2, 10)
    a.cfg.max_model_len = b.cfg.max_model_len = 50  # lower than the router knows: the backend refuses
    st, body, _ = await fleet.post("/v1/completions", {"model": MODEL, "prompt": "y " * 200, "max_tokens": 4})
    assert st == 400 and "maximum context length" in body["error"]["message"], body


async def test_dead_backend_is_ejected_and_readmitted(fleet: Setup) -> None:
    a, _b = fleet.workers
    rid = a.url.split("//")[1]
    fs = fleet.server.fleet
    await a.stop()
    await wait_until(lambda: rid not in fs.replicas, 10, "the stopped backend to be ejected")
    for i in range(3):
        st, _, h = await fleet.post("/v1/completions", {"model": MODEL, "prompt": f"z{i}", "max_tokens": 1})
        assert st == 200 and h["x-corral-replica"] != rid
    await a.start(port=a.port)  # back on the same port
    await wait_until(lambda: rid in fs.replicas and fs.replicas[rid].healthy, 10, "re-admission")


def test_corral_router_cli_with_the_example_policy(tmp_path: Path) -> None:
    """``corral router --backend URL --policy manifests/examples``: routes to the backend, runs the policy's
    adapter paging (the pinned adapter is loaded without a request for it), loads another on demand."""
    base = "llama-3.1-8b-instruct"  # the example ModelPool's model (pins support-bot)

    async def run() -> None:
        w = FakeVllm(FakeVllmConfig(model=base, decode_s_per_token=0.001))
        await w.start()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "corral.api.cli", "router", "--backend", w.url, "--policy",
               str(ROOT / "manifests/examples"), "--http-port", "0", "--grpc-port", "0"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line.startswith("corral router: http "), line
            url = line.split()[3]
            async with aiohttp.ClientSession() as http:

                async def ready() -> bool:
                    async with http.get(url + "/ready") as r:
                        return r.status == 200

                deadline = time.monotonic() + 20
                while not await ready():
                    assert time.monotonic() < deadline, "router never became ready"
                    await asyncio.sleep(0.05)
                body = {"model": base, "prompt": "hello", "max_tokens": 2}
                async with http.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                await wait_until(lambda: "support-bot" in w.adapters, 20, "the pinned adapter to be loaded")
                assert (
                    w.adapters["support-bot"] == "/var/lib/corral/adapters/support-bot"
                )  # its file:// source
                async with http.post(url + "/v1/completions", json={**body, "model": "sql-coder"}) as r:
                    assert r.status == 200, await r.text()
                assert "sql-coder" in w.adapters and w.counters["requests"] == 2
        finally:
            proc.terminate()
            _, err = await proc.communicate()
            await w.stop()
        # the example policy leaves prefixIndex at its default: approximate without --kv-events-port, quietly
        # (only a policy that sets prefixIndex: precise itself is told; tests/unit/test_router_first_contact)
        assert "prefixIndex is 'precise'" not in err.decode(), err.decode()

    asyncio.run(run())


async def test_backend_dying_mid_stream_is_an_error_not_a_truncated_success(fleet: Setup) -> None:
    for w in fleet.workers:
        w.cfg.abort_after_tokens = 2  # both drop the connection after 2 tokens
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 6, "stream": True}
    async with fleet.http.post(fleet.url + "/v1/completions", json=body) as r:
        assert r.status == 200  # the first token was out: a 200 stream that ends in an error event
        events = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert "[DONE]" not in events
    err = json.loads(events[-1])["error"]
    assert err["code"] == 502 and "after streaming started" in err["message"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == " t t"
    st, data, _ = await fleet.post("/v1/completions", {**body, "stream": False})
    assert st == 502 and data["error"]["type"] == "engine_error", data


async def test_backends_behind_an_api_key() -> None:
    """vLLM started with --api-key: without the key the router never admits it and says why; with it
    (BackendPool api_key, the CLI's --backend-api-key-file) probes and requests carry it."""
    w = FakeVllm(FakeVllmConfig(decode_s_per_token=0.001, api_key="s3cret"))
    await w.start()
    servers = []
    try:
        for key in (None, "s3cret"):
            srv = RouterServer(StaticBackends([w.url]), RouterConfig(index_mode="approximate"),
                               pool_cls=BackendPool, scrape_interval_s=0.05, api_key=key)  # fmt: skip
            await srv.start()
            servers.append(srv)
        no_key, with_key = servers
        await with_key.wait_for_replicas(1, 10)
        pool = no_key.router.pool
        st = await wait_until(lambda: [s for s in pool.status() if s["failures"] > 0], 10, "a failed probe")
        assert (
            not st[0]["admitted"]
            and "401" in st[0]["last_error"]
            and "api key" in st[0]["last_error"].lower()
        )
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
            async with http.post(with_key.http_url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
        assert w.counters["requests"] == 1
    finally:
        for srv in servers:
            await srv.stop()
        await w.stop()


async def test_adapter_lost_by_a_backend_is_loaded_again_not_a_404() -> None:
    """A backend that restarted (or had an adapter unloaded) answers 404 for an adapter the router still
    believes loaded: the router loads it again and the request succeeds."""
    cfg = RouterConfig(index_mode="approximate", adapters={"sql-coder": (MODEL, "file:///adapters/sql")})
    s = await _setup(1, cfg)
    try:
        w = s.workers[0]
        req = {"model": "sql-coder", "prompt": "select 1", "max_tokens": 1}
        assert (await s.post("/v1/completions", req))[0] == 200 and w.counters["lora_loads"] == 1
        s.server.router.pool.health_every = 10**9  # no /v1/models refresh from now on: the router can't know
        del w.adapters["sql-coder"]  # lost behind the router's back
        st, body, _ = await s.post("/v1/completions", req)
        assert st == 200, body
        assert w.counters["lora_loads"] == 2 and "sql-coder" in w.adapters
    finally:
        await s.http.close()
        await s.server.stop()
        for x in s.workers:
            await x.stop()
