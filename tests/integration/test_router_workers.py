"""``python -m corral.router.server --workers N``: N router processes on one port (SO_REUSEPORT), each
rebuilding its state from the engines' event streams. Real processes on loopback: sim engine replicas and
the router parent with its workers. Every worker serves, and a prompt prefix goes to the same replica
(the one holding it) whichever worker takes the connection; SIGTERM stops every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import defaultdict
from typing import Any

import aiohttp
import grpc
import pytest
from corral.bench.procs import start_engine, start_router
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODEL = "llama-8b"
WORKERS = 2
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a new connection per channel: any worker


def _worker_of(request_id: str) -> str:
    """Request ids are ``cmpl-<8 hex of the process><counter>``: the process part names the worker."""
    return request_id[5:13]


def _prefix(i: int) -> str:
    return f"system prompt {i}: " + " ".join(f"rule-{i}-{k}" for k in range(40)) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _post(url: str, prompt: str) -> tuple[str, str, int]:
    """One completion on a new connection (the kernel picks the worker per connection)."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        async with s.post(url + "/v1/completions", json=body) as r:
            data: Any = await r.json()
            assert r.status == 200, data
            cached = data["usage"]["prompt_tokens_details"]["cached_tokens"]
            return _worker_of(data["id"]), r.headers["x-corral-replica"], cached


def test_workers_share_the_port_and_route_a_prefix_to_the_same_replica(tmp_path: Any) -> None:
    engines = [start_engine(f"h100-{i}", MODEL, log_dir=tmp_path) for i in range(2)]
    router = None
    try:
        router = start_router(
            [e.address for e in engines], extra=["--workers", str(WORKERS)], log_dir=tmp_path
        )
        line = router.proc.match.string
        assert f"workers {WORKERS}" in line, line
        pids = [int(p) for p in line.split("(pids ")[1].split(")")[0].split(",")]
        assert len(pids) == WORKERS and all(_alive(p) for p in pids)

        url = router.http_url

        async def ready() -> None:  # every worker has both engines (their event streams are up)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                for _ in range(8 * WORKERS):
                    async with s.get(url + "/ready") as r:
                        assert r.status == 200 and (await r.json())["replicas"] == 2

        wait_until(lambda: asyncio.run(ready()) is None, 30, "every worker to see both engines")

        async def views(prompt: str) -> dict[str, set[tuple[str, bool]]]:
            """Dry-run decisions (Explain) over new connections: worker -> {(replica, prefix cached)}."""
            out: dict[str, set[tuple[str, bool]]] = defaultdict(set)
            for _ in range(6 * WORKERS):
                async with grpc.aio.insecure_channel(router.grpc_address, options=_OWN_CONNECTION) as ch:
                    req = rpb.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=2)
                    r = await rpb_grpc.RouterStub(ch).Explain(rpb.ExplainRequest(request=req))
                out[_worker_of(r.request_id)].add((r.replica_id, r.cached_blocks > 0))
            return out

        def agreed(prompt: str, replica: str) -> bool:
            """Every worker would send ``prompt`` to ``replica``, where its prefix is cached (each worker
            learned it from the engine's events; until then a worker may not know it yet)."""
            v = asyncio.run(views(prompt))
            return len(v) == WORKERS and all(s == {(replica, True)} for s in v.values())

        seen: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        for i in range(4):
            seen[i].append(asyncio.run(_post(url, _prefix(i) + "question 0?")))  # the prefix's first
            holder = seen[i][0][1]
            for rnd in range(1, 7):
                prompt = _prefix(i) + f"question {rnd}?"
                wait_until(lambda p=prompt, h=holder: agreed(p, h), 20, f"every worker to route prefix {i}")
                seen[i].append(asyncio.run(_post(url, prompt)))
        for i, rows in seen.items():
            # whichever worker took the connection, the prefix went to its holder and hit its cache
            assert {rep for _, rep, _ in rows} == {rows[0][1]}, (
                f"prefix {i}: (worker, replica, cached) {rows}"
            )
            assert all(cached > 0 for _, _, cached in rows[1:]), rows
        by_worker = {w for rows in seen.values() for w, _, _ in rows[1:]}
        assert len(by_worker) == WORKERS, f"connections reached only workers {by_worker}"  # all serve

        async def grpc_call() -> str:
            async with grpc.aio.insecure_channel(router.grpc_address) as ch:
                resp = await rpb_grpc.RouterStub(ch).Generate(
                    rpb.CompletionRequest(model=MODEL, prompt=_prefix(0) + "via gRPC", max_tokens=2)
                )
                return str(resp.replica_id)

        assert asyncio.run(grpc_call()) == seen[0][0][1]  # the gRPC port is shared too

        router.proc.popen.send_signal(signal.SIGTERM)
        assert router.proc.popen.wait(30) == 0
        wait_until(lambda: not any(_alive(p) for p in pids), 30, "every worker to exit")
        router = None
    finally:
        if router is not None:
            os.killpg(router.proc.pid, signal.SIGKILL)  # the parent and its workers (one session)
            router.proc.popen.wait(10)
        for e in engines:
            e.proc.kill()


def test_workers_must_be_positive() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "corral.router.server", "--workers", "0", "--engines", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--workers must be >= 1" in r.stderr


def test_a_killed_worker_is_replaced(tmp_path: Any) -> None:
    engines = [start_engine(f"h100-{i}", MODEL, log_dir=tmp_path) for i in range(2)]
    router = None
    try:
        router = start_router([e.address for e in engines], extra=["--workers", "2"], log_dir=tmp_path)
        line = router.proc.match.string
        victim = int(line.split("(pids ")[1].split(",")[0])
        before: set[str] = set()

        def workers_seen() -> set[str]:
            async def go() -> set[str]:
                return {(await _post(router.http_url, _prefix(9) + f"q{k}"))[0] for k in range(12)}

            return asyncio.run(go())

        before = wait_until(lambda: workers_seen() if len(workers_seen()) == 2 else None, 30, "both workers")
        os.kill(victim, signal.SIGKILL)
        # a new worker (a new process, so a new request-id prefix) takes the dead one's place on the port
        wait_until(lambda: len(workers_seen() - before) >= 1, 60, "a replacement worker serving")
        assert not _alive(victim)
        assert "exited with code -9: restarting" in router.proc.log_path.read_text()
    finally:
        if router is not None:
            os.killpg(router.proc.pid, signal.SIGKILL)
            router.proc.popen.wait(10)
        for e in engines:
            e.proc.kill()
