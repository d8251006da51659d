"""Hostile clients on the wire, against a real router over sim engines on 127.0.0.1: slow-loris clients
(headers or body trickled) are closed by the router's timeouts without tying it up, and thousands of
concurrent streams (SSE and gRPC) that disconnect mid-way leave no in-flight slot, no engine request and
no extra asyncio task behind; each is counted 499.

The router here runs with short timeouts (``header_timeout_s`` / ``body_timeout_s`` of 1 s, the shipped
values are in :mod:`corral.router.server.limits`) so the tests wait on the behaviour, not on 75 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from fuzz_testkit import MODEL, Harness, http_request, raw_http, tried, wait_for

TIMEOUT_S = 1.0
STREAMS = int(os.environ.get("CORRAL_FUZZ_STREAMS", "2000"))
LORIS = 200


@pytest.fixture(scope="module")
def slow_harness() -> Iterator[Harness]:
    h = Harness(time_scale=5.0, http_kw={"header_timeout_s": TIMEOUT_S, "body_timeout_s": TIMEOUT_S}).start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def stream_harness() -> Iterator[Harness]:
    """The shipped timeouts (a 1 s header timeout would also close legitimate clients of a router whose
    loop is busy accepting thousands of connections at once), a queue bound over the test's streams, and a
    long staleness bound: the sim engines share the router's loop here, so their load samples are late
    while it serves thousands of streams (separate processes in production)."""
    h = Harness(time_scale=5.0, max_queue_per_replica=4 * STREAMS, stale_after_s=60.0).start()
    try:
        yield h
    finally:
        h.stop()


def ok_request(h: Harness) -> int:
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode()
    r = raw_http(h.http_port, http_request("/v1/completions", body), timeout=30)
    assert r is not None
    return r.status


def test_slow_loris_headers_are_closed(slow_harness: Harness) -> None:
    """LORIS connections trickle their headers (a byte every 0.1 s, never finishing): the router serves
    others meanwhile and closes every one of them after its header timeout."""
    h = slow_harness
    assert ok_request(h) == 200
    base_tasks = h.tasks()
    socks = []
    for _ in range(LORIS):
        s = socket.create_connection(("127.0.0.1", h.http_port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    tried("slow clients: slow-loris headers", LORIS)
    assert ok_request(h) == 200  # not tied up
    closed: set[int] = set()
    t0 = time.monotonic()
    while len(closed) < LORIS:
        assert time.monotonic() - t0 < 30, (
            f"{LORIS - len(closed)} slow-loris connections still open after 30 s"
        )
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.send(b"a")
                if s.recv(1024) == b"":
                    closed.add(i)
            except BlockingIOError:
                pass
            except OSError:  # reset / broken pipe: the router closed it
                closed.add(i)
        time.sleep(0.1)  # the client's trickle rate
    for s in socks:
        s.close()
    assert ok_request(h) == 200
    h.settle(base_tasks)


def test_slow_body_is_408(slow_harness: Harness) -> None:
    """Headers complete, body trickled a byte at a time: 408 naming the limit, within the body timeout."""
    h = slow_harness
    tried("slow clients: trickled body", 1)
    body = json.dumps({"model": MODEL, "prompt": "x" * 200, "max_tokens": 2}).encode()
    s = socket.create_connection(("127.0.0.1", h.http_port), timeout=30)
    s.sendall(
        http_request("/v1/completions", b"")[: -len("\r\n")].replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)
        )
        + b"\r\n"
    )
    got = b""
    s.setblocking(False)
    for b in body:
        try:
            s.send(bytes([b]))
        except OSError:
            break
        try:
            got += s.recv(65536)
            if got:
                break
        except BlockingIOError:
            pass
        time.sleep(0.05)
    s.settimeout(10)
    try:  # the whole response (the router lingers on the unread body, so do not wait for its close)
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    s.close()
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:300]
    err = json.loads(payload)["error"]
    assert err["code"] == 408 and f"{TIMEOUT_S:g} s" in err["message"]
    h.settle()


async def _sse_streams(h: Harness, n: int) -> tuple[int, int]:
    """n concurrent SSE streams: once the router holds all n in flight (some streaming tokens, the rest queued
    at the engines, whose batch is smaller) and at least one has its first event, every client drops its
    connection. Returns (the most in flight at once, how many had their first event)."""
    started = 0
    all_open = asyncio.Event()
    refused: list[str] = []

    async def first_event(r: asyncio.StreamReader) -> None:
        nonlocal started
        try:
            await r.readuntil(b"data: ")
            started += 1
        except asyncio.IncompleteReadError as e:
            refused.append(e.partial.decode("latin-1")[:400])

    async def one(i: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", h.http_port)
        body = json.dumps({"model": MODEL, "prompt": f"s{i}", "max_tokens": 3000, "stream": True}).encode()
        w.write(http_request("/v1/completions", body))
        reader = asyncio.create_task(first_event(r))
        await all_open.wait()
        w.transport.abort()  # mid-stream: 3000 tokens take minutes at this time scale
        reader.cancel()

    clients = [asyncio.create_task(one(i)) for i in range(n)]
    peak = 0
    t0 = time.monotonic()
    while not (peak >= n and started > 0) and time.monotonic() - t0 < 120 and not refused:
        await asyncio.sleep(0.05)
        peak = max(peak, await asyncio.to_thread(h.dispatched))
    all_open.set()
    await asyncio.gather(*clients)
    assert not refused, f"{len(refused)} refused, e.g. {refused[0]}"
    return peak, started


def test_thousands_of_sse_streams_disconnect_mid_way(stream_harness: Harness) -> None:
    h = stream_harness
    assert ok_request(h) == 200  # warm: the engines' step loops and streams exist before the baseline
    base_tasks = h.tasks()
    before = h.request_codes().get("499", 0.0)
    peak, started = asyncio.run(_sse_streams(h, STREAMS))
    tried("slow clients: SSE streams dropped mid-way", STREAMS)
    assert peak == STREAMS and started > 0, (peak, started)
    h.settle(base_tasks, timeout=120)
    wait_for(lambda: h.engine_running() == 0, 30, "the engines to drop the abandoned requests")
    assert h.request_codes().get("499", 0.0) - before == STREAMS
    assert "500" not in h.request_codes()
    assert ok_request(h) == 200


def test_grpc_streams_cancelled_mid_way(stream_harness: Harness) -> None:
    h = stream_harness
    n = max(1, min(200, STREAMS // 4))  # one client channel (its HTTP/2 stream limit)
    assert ok_request(h) == 200
    base_tasks = h.tasks()
    before = h.request_codes().get("499", 0.0)

    async def run() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(h.grpc_address) as ch:
            stub = rpb_grpc.RouterStub(ch)
            calls = [
                stub.GenerateStream(rpb.CompletionRequest(model=MODEL, prompt=f"g{i}", max_tokens=3000))
                for i in range(n)
            ]
            firsts = [asyncio.ensure_future(c.read()) for c in calls]
            peak, t0 = 0, time.monotonic()
            while not (peak >= n and any(f.done() for f in firsts)) and time.monotonic() - t0 < 120:
                await asyncio.sleep(0.05)
                peak = max(peak, sum(len(r.in_flight) for r in h.server.router.fleet.replicas.values()))
            for c in calls:
                c.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            return peak, sum(1 for f in firsts if not f.cancelled() and f.exception() is None)

    peak, started = h.run(run(), timeout=300)  # on the router's loop: grpc.aio wants one loop per process
    tried("slow clients: gRPC streams cancelled mid-way", n)
    assert peak == n and started > 0, (peak, started)
    h.settle(base_tasks, timeout=120)
    wait_for(lambda: h.engine_running() == 0, 30, "the engines to drop the cancelled requests")
    assert h.request_codes().get("499", 0.0) - before == n
