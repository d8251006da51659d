"""vLLM-style KV events (ZMQ PUB, msgpack, vLLM's own block hashes) from fake workers on two loopback hosts
feed the router's precise prefix index: blocks a backend cached for clients the router never saw attract the
next request with that prefix, and evictions take them out again."""

from __future__ import annotations

import functools
import socket

import aiohttp
import pytest
from corral.router.backends.discovery import StaticBackends
from corral.router.backends.pool import BackendPool
from corral.router.request import build_request
from corral.router.server import RouterConfig, RouterServer
from corral.serve.fakevllm import FakeVllm, FakeVllmConfig
from waiting import async_wait_until

pytest.importorskip("zmq")
pytest.importorskip("msgpack")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "llama-8b"
HOSTS = ("127.0.0.2", "127.0.0.3")  # one port for every backend's publisher, as with vLLM pods


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s2:
                s2.bind((HOSTS[1], port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both loopback hosts")


wait_until = functools.partial(async_wait_until, interval=0.05)  # tick= pumps the subscriber


async def test_kv_events_feed_the_precise_index_across_hash_spaces() -> None:
    kv_port = _free_port()
    cfg = FakeVllmConfig(decode_s_per_token=0.001, kv_events_port=kv_port, cache_blocks=64)
    workers = [FakeVllm(cfg, name=f"w{i}") for i in range(2)]
    for w, host in zip(workers, HOSTS, strict=True):
        await w.start(host)
    server = RouterServer(StaticBackends([w.url for w in workers]), RouterConfig(index_mode="precise"),
                          pool_cls=BackendPool, scrape_interval_s=0.05, kv_events_port=kv_port)  # fmt: skip
    await server.start()
    http = aiohttp.ClientSession()
    try:
        await server.wait_for_replicas(2, 10)
        a, b = workers
        rid_b = b.url.split("//")[1]
        prompt = "You answer questions about the billing system. " * 16  # 784 chars: 196 tokens, 12 blocks
        hashes = build_request("x", MODEL, text=prompt, block_size=16).block_hashes
        r_b = server.fleet.replicas[rid_b]

        async def direct_to_b() -> None:  # a client the router never sees; vLLM would publish its blocks
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            async with http.post(b.url + "/v1/completions", json=body) as r:
                assert r.status == 200

        # ZMQ subscriptions take a moment: re-send until the router's index of b holds the prompt's blocks
        full = len(hashes)
        await wait_until(
            lambda: r_b.index.match(hashes) == full, 10, "b's blocks in the index", tick=direct_to_b
        )
        assert server.fleet.replicas[a.url.split("//")[1]].index.match(hashes) == 0
        async with http.post(
            server.http_url + "/v1/completions",
            json={"model": MODEL, "prompt": prompt + "And my question?", "max_tokens": 1},
        ) as r:
            assert r.status == 200
            assert (
                r.headers["x-corral-replica"] == rid_b
            )  # where the cache is, though the router sent nothing
            usage = (await r.json())["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(hashes) * 16
        # eviction at the backend (64-block cache): BlockRemoved takes the blocks out of the router's index
        for i in range(8):
            body = {"model": MODEL, "prompt": f"filler {i} " * 120, "max_tokens": 1}
            async with http.post(b.url + "/v1/completions", json=body) as r:
                assert r.status == 200
        await wait_until(lambda: r_b.index.match(hashes) == 0, 10, "the evicted blocks to leave the index")
        kv = server.router.pool.by_replica[rid_b].kv
        assert kv.batches > 0 and kv.translator.skipped == 0
    finally:
        await http.close()
        await server.stop()
        for w in workers:
            await w.stop()
