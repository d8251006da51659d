"""First contact with the standalone router, on loopback: fake vLLM workers (:mod:`corral.serve.fakevllm`)
behind a real ``BackendPool`` router. A backend of an unknown GPU class is reported (it was dropped silently),
a backend serving a model the ModelPool does not declare is warned about once, a request for a model no
replica serves says what the connected replicas do serve, and ``corral explain`` without a key names
``--api-key``."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from corral.api.cli import main
from corral.api.profiles import resolve_profile
from corral.router.backends.discovery import StaticBackends
from corral.router.backends.pool import BackendPool
from corral.router.server import RouterConfig, RouterServer, load_api_keys
from corral.router.server.auth import append_key
from corral.serve.fakevllm import FakeVllm, FakeVllmConfig
from waiting import async_wait_until as wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _server(spec: str, config: RouterConfig | None = None, **kw: Any) -> RouterServer:
    return RouterServer(
        StaticBackends([spec], poll_interval_s=0.2), config or RouterConfig(index_mode="approximate"),
        pool_cls=BackendPool, scrape_interval_s=0.05, fail_threshold=2, probe_timeout_s=0.5, **kw,
    )  # fmt: skip


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_a_backend_of_an_unknown_gpu_class_is_reported_and_a_pool_class_is_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral.router.backends.pool")
    w = FakeVllm(FakeVllmConfig(decode_s_per_token=0.001), name="w0")
    await w.start()
    try:
        s = _server(f"B200={w.url}")
        await s.start()
        try:
            await wait_until(
                lambda: _warnings(caplog, "GPU class 'B200'"), what="the unknown class's warning"
            )
            assert not s.router.fleet.replicas
            await asyncio.sleep(0.3)  # several more probes: still one warning, not one per probe
            assert len(_warnings(caplog, "GPU class 'B200'")) == 1
        finally:
            await s.stop()
        s = _server(f"B200={w.url}", profiles={"B200": resolve_profile("H100")})  # the pool's gpuClasses
        await s.start()
        try:
            await s.wait_for_replicas(1, 10)
        finally:
            await s.stop()
    finally:
        await w.stop()


async def test_an_undeclared_model_warns_once_and_the_503_names_the_served_models(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral.router.backends.pool")
    w = FakeVllm(FakeVllmConfig(decode_s_per_token=0.001, model="llama-8b"), name="w0")
    await w.start()
    s = _server(
        w.url, RouterConfig(index_mode="approximate", models={"qwen-7b"}), declared_models=["qwen-7b"]
    )
    await s.start()
    try:
        await s.wait_for_replicas(1, 10)
        [msg] = _warnings(caplog, "does not declare")
        assert "'llama-8b'" in msg and "qwen-7b" in msg
        async with aiohttp.ClientSession() as http:
            body = {"model": "qwen-7b", "prompt": "hi", "max_tokens": 2}
            async with http.post(s.http_url + "/v1/completions", json=body) as r:
                assert r.status == 503
                text = await r.text()
        assert "qwen-7b" in text and "the connected replicas serve: llama-8b" in text
    finally:
        await s.stop()
        await w.stop()


@pytest.fixture
def keyed_router(tmp_path: Path) -> Iterator[str]:
    keys = tmp_path / "keys.yaml"
    append_key(keys, "ops", "admin")
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def up() -> None:
        srv = RouterServer([], RouterConfig(api_keys=load_api_keys(keys, poll_s=0.0)))
        await srv.start("127.0.0.1", 0, 0)
        box["srv"] = srv
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(up()), loop.run_forever()), daemon=True)
    t.start()
    assert ready.wait(30), "router did not come up"
    yield box["srv"].grpc_address
    asyncio.run_coroutine_threadsafe(box["srv"].stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_explain_without_a_key_names_api_key(keyed_router: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--router", keyed_router, "--request-id", "x"]) == 1
    err = capsys.readouterr().err
    assert "--api-key" in err


async def test_a_request_before_any_replica_connects_is_503_not_404() -> None:
    s = RouterServer([], RouterConfig())  # no --policy, nothing connected
    await s.start("127.0.0.1", 0, 0)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "llama-8b", "prompt": "hi", "max_tokens": 2}
            async with http.post(s.http_url + "/v1/completions", json=body) as r:
                assert r.status == 503, await r.text()
                assert "no engine replica is connected" in await r.text()
    finally:
        await s.stop()
