"""Helpers for the fault tests (tests/integration/test_faults_*.py): a fleet of sim engine *processes*
(killable with SIGKILL, stallable with SIGSTOP) behind routers, and clients that record how each
streaming request ended (completed, error event / status, tokens received before it) instead of raising.

The processes come from :mod:`corral.bench.procs` (the recovery benchmark uses the same ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from corral.bench.procs import EngineProc, RouterProc, start_engine, start_router
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc

MODEL = "llama-8b"
RECORD_ENV = "CORRAL_FAULTS_RECORD"


def record(name: str, seconds: float, how: str) -> None:
    """Add a measured figure to the JSON file named by ``$CORRAL_FAULTS_RECORD`` (no-op when unset):
    ``{"meta": provenance, "figures": {name: {"seconds": s, "how": how}}}``; scripts/fault-figures.sh runs
    the fault tests with it set and docs/reliability.md quotes the file."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    from corral.bench.provenance import provenance

    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data["meta"] = provenance()
    data.setdefault("figures", {})[name] = {"seconds": round(seconds, 3), "how": how}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _apiserver_pid(run_dir: Path) -> int:
    """The kube-apiserver's pid from e2e/cluster/up.sh's pids file (lines ``PID NAME STARTTIME``)."""
    for line in (run_dir / "pids").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "kube-apiserver":
            return int(parts[0])
    raise LookupError(f"no kube-apiserver in {run_dir / 'pids'}")


@contextlib.contextmanager
def apiserver_frozen(cluster: Any, seconds: float) -> Iterator[None]:
    """Freeze the local control plane's kube-apiserver (SIGSTOP: connections stay open, nothing answers)
    for ``seconds`` and thaw it (SIGCONT) on exit, whatever happens; then wait until it answers again.
    Runs the body while frozen; the freeze lasts ``seconds`` in all (the body's time included)."""
    pid = _apiserver_pid(cluster.run_dir)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
        left = seconds - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)  # the fault itself lasts this long (not a wait for a condition)
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait_until(lambda: cluster.request("GET", "/readyz", timeout=5).status == 200,
                       timeout=60, what="kube-apiserver ready after SIGCONT")  # fmt: skip


async def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll ``cond`` (sync) until truthy; return the seconds it took; fail naming ``what`` on timeout."""
    t0 = time.monotonic()
    last: Any = None
    while True:
        try:
            last = cond()
            if last:
                return time.monotonic() - t0
        except Exception as e:  # not there yet
            last = e
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def wait_for_async(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> float:
    """:func:`wait_for` with an async ``cond``."""
    t0 = time.monotonic()
    last: Any = None
    while True:
        try:
            last = await cond()
            if last:
                return time.monotonic() - t0
        except Exception as e:
            last = e
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class Outcome:
    """How one streaming request ended, as its client saw it."""

    api: str
    i: int
    status: int | str = 0  # HTTP status before streaming, or the gRPC code name ("OK" when it finished)
    tokens: int = 0  # text characters (HTTP) / token ids (gRPC) received
    error: dict[str, Any] | None = None  # the SSE error event's "error", or {"message": details}
    finish_reason: str = ""
    replica: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status in (200, "OK")


@dataclass
class ProcFleet:
    """Sim engine processes and router processes started by a test, all cleaned up by :meth:`close`."""

    log_dir: Path
    engines: list[EngineProc] = field(default_factory=list)
    routers: list[RouterProc] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self.engines]

    def add_engine(self, replica_id: str, profile: str = "H100", **kw: Any) -> EngineProc:
        e = start_engine(replica_id, MODEL, profile=profile, log_dir=self.log_dir, **kw)
        self.engines.append(e)
        return e

    def add_router(self, name: str = "router", **kw: Any) -> RouterProc:
        r = start_router(self.addresses, name=name, log_dir=self.log_dir, **kw)
        self.routers.append(r)
        return r

    def close(self) -> None:
        for p in [*(r.proc for r in self.routers), *(e.proc for e in self.engines)]:
            p.terminate(timeout=5)


async def http_stream(
    url: str, body: dict[str, Any], i: int = 0, headers: dict[str, str] | None = None
) -> Outcome:
    """POST a streaming completion; read SSE to the end; never raises for a server-side failure."""
    out = Outcome("http", i)
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        out.status = resp.status
        out.replica = resp.headers.get("x-corral-replica", "")
        if resp.status != 200:
            text = await resp.text()
            try:
                out.error = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                out.error = {"message": text}
            return out
        async for line in resp.content:
            t = line.decode().strip()
            if not t.startswith("data: ") or t == "data: [DONE]":
                continue
            ev = json.loads(t[6:])
            if "error" in ev:
                out.error = ev["error"]
            elif ev.get("choices"):
                ch = ev["choices"][0]
                out.tokens += len(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
                out.finish_reason = ch.get("finish_reason") or out.finish_reason
    return out


async def grpc_stream(address: str, req: rpb.CompletionRequest, i: int = 0) -> Outcome:
    """Run ``GenerateStream``; record the final status instead of raising."""
    out = Outcome("grpc", i)
    async with grpc.aio.insecure_channel(address) as ch:
        st = rpb_grpc.RouterStub(ch)
        try:
            async for c in st.GenerateStream(req):
                out.tokens += len(c.token_ids)
                out.replica = c.replica_id or out.replica
                out.finish_reason = c.finish_reason or out.finish_reason
            out.status = "OK"
        except grpc.aio.AioRpcError as e:
            out.status = e.code().name
            out.error = {"message": e.details() or "", "code": e.code().name}
    return out
