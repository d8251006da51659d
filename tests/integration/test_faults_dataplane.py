"""Data-plane faults with real processes on 127.0.0.1 (issue 14, part 1): sim engine replicas are OS
processes killed with SIGKILL or stalled with SIGSTOP; routers are this process's RouterServer (its
fleet state is observable) or standalone router processes.

- an engine killed while requests queue and stream: queued ones are re-routed and complete, streaming
  ones end with a retriable error naming the replica (SSE error event / gRPC UNAVAILABLE), none hangs;
- an engine that stalls (alive, silent) is ejected within the staleness bound, its in-flight requests
  end, and it is re-admitted when it resumes;
- an adapter whose file is missing or corrupt: its requests get an error naming it, others are unaffected;
- a router killed: the other router's clients are unaffected; a restarted router rebuilds the prefix
  index and adapter residency from the engines' streams.

No timing is asserted beyond the bounded waits; the measured figures are docs/benchmarks/recovery.md's
(``corral bench recovery``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from corral.router.server import RouterConfig, RouterServer
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from faults_testkit import (
    MODEL,
    Outcome,
    ProcFleet,
    grpc_stream,
    http_stream,
    record,
    wait_for,
    wait_for_async,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STALE_S = 0.5
LONG = "z" * 12000  # ~3000 sim tokens: requests sit in prefill (queued) long enough to be caught there


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcFleet]:
    f = ProcFleet(tmp_path / "logs")
    try:
        yield f
    finally:
        f.close()


def three_engines(f: ProcFleet, **kw: object) -> None:
    for rid, prof in (("h100-0", "H100"), ("h100-1", "H100"), ("a100-2", "A100-80GB")):
        f.add_engine(rid, prof, **kw)  # type: ignore[arg-type]


async def in_process_router(f: ProcFleet, **cfg: object) -> RouterServer:
    cfg.setdefault("policy", "round_robin")
    cfg.setdefault("stale_after_s", STALE_S)
    r = RouterServer(f.addresses, RouterConfig(**cfg))  # type: ignore[arg-type]
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(len(f.engines), timeout=30)
    return r


# ---- an engine process killed while requests queue and stream --------------------------------------
async def test_engine_process_killed_while_requests_queue_and_stream(procs: ProcFleet) -> None:
    three_engines(procs, time_scale=2.0)  # slow enough that prefills queue (at 20x a prefill is ~3 ms)
    r = await in_process_router(procs)
    try:
        victim_proc = procs.engines[0]
        victim = victim_proc.replica_id
        url = r.http_url + "/v1/completions"
        tasks = [
            asyncio.create_task(
                http_stream(
                    url, {"model": MODEL, "prompt": f"{i:05d} {LONG}", "max_tokens": 64, "stream": True}, i
                )
            )
            for i in range(18)
        ] + [
            asyncio.create_task(
                grpc_stream(
                    r.grpc_address,
                    rpb.CompletionRequest(model=MODEL, prompt=f"{i:05d} {LONG}", max_tokens=64),
                    i,
                )
            )
            for i in range(18, 30)
        ]

        def mixed() -> bool:  # some of the victim's requests streaming, some still before their first token
            fl = r.fleet.replicas[victim].in_flight.values()
            return any(x.started for x in fl) and sum(not x.started for x in fl) >= 3

        await wait_for(mixed, 60, "the victim busy with streaming and queued requests")
        t_kill = time.monotonic()
        victim_proc.proc.kill()
        removed = await wait_for(lambda: victim not in r.fleet.replicas, 10, "the killed replica removed")
        done, pending = await asyncio.wait(tasks, timeout=90)
        assert not pending, f"{len(pending)} requests hang after the kill"
        all_ended = time.monotonic() - t_kill
        outs: list[Outcome] = [t.result() for t in done]

        lost = [o for o in outs if not o.ok and o.tokens == 0]
        assert not lost, lost  # nothing that had not started streaming fails: it was re-routed
        broken = [o for o in outs if not o.ok]
        for o in broken:  # streaming ones end with a retriable error that names the replica
            assert victim in o.error["message"], o  # type: ignore[index]
            if o.api == "http":
                assert o.status == 200 and o.error["type"] == "engine_error" and o.error["code"] == 502, o  # type: ignore[index]
            else:
                assert o.status == "UNAVAILABLE", o
        assert all(o.tokens == 64 and o.finish_reason == "length" for o in outs if o.ok)
        retried = [rec for rec in r.router.explains.values() if len(rec.attempts) > 1]
        # the victim's queued requests were retried elsewhere (another replica, by this router's choice)
        assert any(rec.attempts[0] == victim for rec in retried), [rec.attempts for rec in retried]
        assert broken, "the kill hit no streaming request"
        print(
            f"killed {victim}: removed after {removed:.3f}s, {len(retried)} re-routed, {len(broken)} broken "
            f"mid-stream, every request ended {all_ended:.2f}s after the kill"
        )
        record("engine_kill_removed_s", removed, "SIGKILL of an engine process -> out of the router's fleet")
        record("engine_kill_all_ended_s", all_ended, f"SIGKILL -> all {len(outs)} in-flight requests ended")
        # the dead replica gets nothing new; the others serve
        for i in range(6):
            o = await http_stream(
                url, {"model": MODEL, "prompt": f"after {i}", "max_tokens": 2, "stream": True}, i
            )
            assert o.ok and o.replica != victim, o
    finally:
        await r.stop(0)


# ---- an engine that stalls (alive but silent) -----------------------------------------------------
async def test_stalled_engine_is_ejected_and_readmitted(procs: ProcFleet) -> None:
    three_engines(procs)
    r = await in_process_router(procs)
    try:
        stalled = procs.engines[1]
        rid = stalled.replica_id
        url = r.http_url + "/v1/completions"
        inflight = [
            asyncio.create_task(
                http_stream(
                    url, {"model": MODEL, "prompt": f"{i:05d} {LONG}", "max_tokens": 256, "stream": True}, i
                )
            )
            for i in range(9)
        ]
        await wait_for(
            lambda: r.fleet.replicas[rid].in_flight, 60, "requests in flight on the replica to stall"
        )
        stalled.proc.stall()
        ejected = await wait_for(
            lambda: rid not in r.fleet.replicas, STALE_S * 10, "the stalled replica ejected"
        )
        # requests that were in flight on it end (re-routed or a retriable error), none waits for it
        done, pending = await asyncio.wait(inflight, timeout=60)
        assert not pending, f"{len(pending)} requests hang on the stalled replica"
        for o in (t.result() for t in done):
            if not o.ok:  # it had streamed: a retriable engine error saying why
                assert o.tokens > 0 and o.error["type"] == "engine_error", o  # type: ignore[index]
                assert f"engine {rid}" in o.error["message"] and "ejected" in o.error["message"], o  # type: ignore[index]
        for i in range(6):  # new requests avoid it
            o = await http_stream(
                url, {"model": MODEL, "prompt": f"while stalled {i}", "max_tokens": 2, "stream": True}, i
            )
            assert o.ok and o.replica != rid, o
        stalled.proc.cont()
        back = await wait_for(lambda: r.fleet.replicas.get(rid) is not None and r.fleet.replicas[rid].healthy,
                              30, "the resumed replica re-admitted")  # fmt: skip
        seen: set[str] = set()
        for i in range(6):  # round robin reaches it again
            o = await http_stream(
                url, {"model": MODEL, "prompt": f"after {i}", "max_tokens": 2, "stream": True}, i
            )
            assert o.ok, o
            seen.add(o.replica)
        assert rid in seen
        print(f"stalled replica ejected after {ejected:.2f}s, re-admitted {back:.2f}s after SIGCONT")
        record(
            "engine_stall_ejected_s",
            ejected,
            f"SIGSTOP of an engine -> ejected (stale_after_s={STALE_S})",
        )
        record("engine_stall_readmitted_s", back, "SIGCONT -> routable again")
    finally:
        await r.stop(0)


# ---- an adapter whose file is missing or corrupt --------------------------------------------------
async def test_missing_or_corrupt_adapter_file(procs: ProcFleet, tmp_path: Path) -> None:
    from corral.serve.local_adapters import make_tiny_adapter

    good = make_tiny_adapter(tmp_path / "adapters" / "good-lora")
    corrupt = tmp_path / "adapters" / "bad-lora"
    corrupt.mkdir(parents=True)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    missing = tmp_path / "adapters" / "gone-lora"
    three_engines(procs, adapter_cache=tmp_path / "cache")
    adapters = {
        "good-lora": (MODEL, good.as_uri()),
        "bad-lora": (MODEL, corrupt.as_uri()),
        "gone-lora": (MODEL, missing.as_uri()),
    }
    r = await in_process_router(procs, adapters=adapters, policy="corral")
    try:
        url = r.http_url + "/v1/completions"
        for name, why in (("gone-lora", "does not exist"), ("bad-lora", "not a valid safetensors file")):
            o = await http_stream(url, {"model": name, "prompt": "select 1", "max_tokens": 4, "stream": True})
            assert o.status == 503 and o.tokens == 0, o
            msg = o.error["message"]  # type: ignore[index]
            assert f"adapter '{name}'" in msg and why in msg and "FAILED_PRECONDITION" in msg, msg
            g = await grpc_stream(
                r.grpc_address, rpb.CompletionRequest(model=name, prompt="select 1", max_tokens=4)
            )
            assert g.status == "UNAVAILABLE" and f"adapter '{name}'" in g.error["message"], g  # type: ignore[index]
        # others are unaffected: every replica still routable, the good adapter and the base model serve
        assert sum(x.healthy for x in r.fleet.replicas.values()) == 3
        for model in ("good-lora", MODEL, "good-lora", MODEL):
            o = await http_stream(
                url, {"model": model, "prompt": "select 1", "max_tokens": 4, "stream": True}
            )
            assert o.ok and o.tokens == 4, o
        # the engines' own LoadAdapter (the pager's path) refuses the file naming the adapter too
        ch = grpc.aio.insecure_channel(procs.addresses[0])
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await epb_grpc.EngineStub(ch).LoadAdapter(
                epb.LoadAdapterRequest(name="bad-lora", source_uri=corrupt.as_uri(), tier="gpu")
            )
        assert "bad-lora" in (ei.value.details() or "")
        await ch.close()
    finally:
        await r.stop(0)


# ---- a router killed; a restarted one rebuilds its state from the engines --------------------------
PREFIX = "You are a helpful assistant for the Corral project. " * 160  # ~130 blocks


async def _explain_blocks(address: str, prompt: str) -> tuple[str, int]:
    async with grpc.aio.insecure_channel(address) as ch:
        ex = await rpb_grpc.RouterStub(ch).Explain(
            rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=prompt))
        )
        return ex.replica_id, ex.cached_blocks


async def _models(http_url: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(http_url + "/v1/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


async def test_router_killed_other_unaffected_restarted_rebuilds(procs: ProcFleet, tmp_path: Path) -> None:
    three_engines(procs)
    a = procs.add_router("router-a", stale_after_s=STALE_S, policy="corral")
    b = procs.add_router("router-b", stale_after_s=STALE_S, policy="corral")
    for rt in (a, b):
        await wait_for_async(lambda rt=rt: _ready(rt.http_url), 30, f"{rt.proc.name} ready with 3 replicas")
    # state worth rebuilding: a cached prefix on one engine, an adapter resident on another
    async with grpc.aio.insecure_channel(a.grpc_address) as ch:
        first = await rpb_grpc.RouterStub(ch).Generate(
            rpb.CompletionRequest(model=MODEL, prompt=PREFIX + "Q0?", max_tokens=2)
        )
    holder = first.replica_id
    async with grpc.aio.insecure_channel(procs.addresses[2]) as ch:
        await epb_grpc.EngineStub(ch).LoadAdapter(
            epb.LoadAdapterRequest(name="sql-lora", source_uri="s3://bucket/sql-lora", tier="gpu")
        )
    probe = PREFIX + "Q1?"
    await wait_for_async(lambda: _has_state(a, probe, holder), 30, "router-a sees the prefix and the adapter")

    # router-b's clients stream while router-a is killed
    url_b = b.http_url + "/v1/completions"
    tasks = [
        asyncio.create_task(
            http_stream(
                url_b, {"model": MODEL, "prompt": f"b{i} " + LONG[:4000], "max_tokens": 48, "stream": True}, i
            )
        )
        for i in range(12)
    ]
    await asyncio.sleep(0)  # let them start
    a.proc.kill()
    done, pending = await asyncio.wait(tasks, timeout=60)
    assert not pending
    outs = [t.result() for t in done]
    assert all(o.ok and o.tokens == 48 for o in outs), [o for o in outs if not o.ok]

    # a restarted router-a has nothing but the engines' streams to rebuild from
    t0 = time.monotonic()
    a2 = procs.add_router("router-a2", stale_after_s=STALE_S, policy="corral")
    await wait_for_async(
        lambda: _has_state(a2, probe, holder), 60, "restarted router rebuilt prefix index and adapters"
    )
    rebuilt = time.monotonic() - t0
    replica, blocks = await _explain_blocks(a2.grpc_address, probe)
    assert replica == holder and blocks >= 100
    print(
        f"restarted router serving after {a2.proc.started_s:.2f}s, state rebuilt {rebuilt:.2f}s after spawn"
    )
    record("router_restart_serving_s", a2.proc.started_s, "router process spawn -> listening")
    record("router_restart_rebuilt_s", rebuilt, "router process spawn -> prefix index + adapters rebuilt")


async def _ready(http_url: str) -> bool:
    async with aiohttp.ClientSession() as s, s.get(http_url + "/ready") as resp:
        return bool((await resp.json())["replicas"] == 3)


async def _has_state(r: object, probe: str, holder: str) -> bool:
    replica, blocks = await _explain_blocks(r.grpc_address, probe)  # type: ignore[attr-defined]
    return replica == holder and blocks >= 100 and "sql-lora" in await _models(r.http_url)  # type: ignore[attr-defined]


# ---- an engine killed while requests wait in the router's admission queue ---------------------------
async def test_engine_killed_while_requests_wait_for_admission(procs: ProcFleet) -> None:
    """Replicas at load.maxQueueRequestsPerReplica, more requests waiting in the router (spec.admission):
    when one engine dies, its requests that had not streamed and the waiting ones all complete on the
    others; nothing gets a 429 after it was let in."""
    from corral.api.admission import AdmissionSpec

    three_engines(procs, time_scale=2.0)
    adm = AdmissionSpec(max_waiting=200, max_wait_ms=120_000)
    r = await in_process_router(procs, max_queue_per_replica=2, admission=adm)
    try:
        victim_proc = procs.engines[0]
        victim = victim_proc.replica_id
        url = r.http_url + "/v1/completions"
        body = {"max_tokens": 32, "stream": True, "model": MODEL}
        tasks = [
            asyncio.create_task(http_stream(url, {**body, "prompt": f"{i:05d} {LONG[:6000]}"}, i))
            for i in range(36)
        ]

        def busy() -> bool:  # the victim holds queued requests and the router holds waiting ones
            fl = r.fleet.replicas[victim].in_flight.values()
            return any(not x.started for x in fl) and r.router.admission.waiting > 0

        await wait_for(busy, 60, "requests queued on the victim and waiting in the router")
        victim_proc.proc.kill()
        done, pending = await asyncio.wait(tasks, timeout=120)
        assert not pending, f"{len(pending)} requests hang"
        outs = [t.result() for t in done]
        lost = [o for o in outs if not o.ok and o.tokens == 0]
        assert not lost, lost  # no 429 / 503 for a request that had not streamed
        for o in outs:
            if not o.ok:
                assert victim in o.error["message"], o  # type: ignore[index]
        assert sum(o.ok for o in outs) >= 30
        retried = [rec.attempts for rec in r.router.explains.values() if len(rec.attempts) > 1]
        assert any(a[0] == victim for a in retried), retried  # re-routed although every replica was full
    finally:
        await r.stop(0)
