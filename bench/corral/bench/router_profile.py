"""Profile the router under the overhead benchmark's load: a py-spy flame graph of the router process.

The same processes as :mod:`corral.bench.router_overhead` (zero-cost echo engines in one process, one
router process with the shipped defaults, a closed-loop load generator here with ``--concurrency``
clients) for one front (``grpc`` or ``http``), while ``py-spy record`` samples the router process. Needs
``py-spy`` (PyPI) on PATH or next to this Python.

    python -m corral.bench.router_profile --api grpc --out docs/benchmarks/router_flame_grpc.svg
    python -m corral.bench.router_profile --api http --format raw --out /tmp/http.txt   # collapsed stacks
    python -m corral.bench.router_profile --idle --engines 32 --out /tmp/idle.svg   # no load: event streams
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from corral.bench import router_overhead as ro


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    return found


async def _load(
    api: str, router: tuple[str, str], conc: int, duration: float, warmup: float
) -> dict[str, Any]:
    import aiohttp
    import grpc
    from corral.v1 import router_pb2 as rpb
    from corral.v1 import router_pb2_grpc as rpb_grpc

    channel = grpc.aio.insecure_channel(router[0])
    stub = rpb_grpc.RouterStub(channel)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = router[1] + "/v1/completions"

    async def via_grpc(prompt: str, i: int) -> None:
        await stub.Generate(rpb.CompletionRequest(model=ro.MODEL, prompt=prompt, max_tokens=4))

    async def via_http(prompt: str, i: int) -> None:
        async with session.post(url, json={"model": ro.MODEL, "prompt": prompt, "max_tokens": 4}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(r.status)

    try:
        return await ro._closed_loop(via_grpc if api == "grpc" else via_http, conc, duration, warmup)
    finally:
        await session.close()
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m corral.bench.router_profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--api", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--out", required=True, help="output file (flame graph SVG, or --format's)")
    ap.add_argument("--format", default="flamegraph", help="py-spy's --format (flamegraph, raw, speedscope)")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument(
        "--idle", action="store_true", help="no load: the router's CPU for keeping up with engines"
    )
    ns = ap.parse_args(argv)
    spy = _py_spy()
    ro._uvloop()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    q: Any = ctx.Queue()
    pe = ctx.Process(target=ro._engine_proc, args=(ns.engines, q, stop), daemon=True)
    pe.start()
    engines = q.get(timeout=60)
    pr = ctx.Process(target=ro._router_proc, args=(engines, "corral", q, stop), daemon=True)
    pr.start()
    router = q.get(timeout=60)
    ro.PIDS.update(engines=[pe.pid or 0], router=[pr.pid or 0], loadgen=[os.getpid()])
    warmup = 0.5
    # argv[0] "py-spy", not the found path: the flame graph's title is this command line (no machine path)
    cmd = ["py-spy", "record", "-r", str(ns.rate), "-o", ns.out, "--format", ns.format, "--nonblocking",
           "--pid", str(pr.pid), "-d", str(int(ns.duration + warmup + 1))]  # fmt: skip
    rec = subprocess.Popen(cmd, executable=spy)
    try:
        if ns.idle:  # event streams and load samples only (every engine sends one every 0.1 s)
            time.sleep(warmup)
            cpu0, t0 = ro._cpu_s([pr.pid or 0]), time.monotonic()
            time.sleep(ns.duration)
            idle_ms = (ro._cpu_s([pr.pid or 0]) - cpu0) / (time.monotonic() - t0) * 1e3
        else:
            res = asyncio.run(_load(ns.api, router, ns.concurrency, ns.duration, warmup))
        rec.wait(timeout=ns.duration + 30)
    finally:
        stop.set()
        for p in (pe, pr):
            p.join(10)
            if p.is_alive():
                p.terminate()
    if ns.idle:
        print(f"idle, {ns.engines} engines: router {idle_ms:.1f} ms CPU per second -> {ns.out}")
        return 0
    print(
        f"{ns.api}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.2f} ms, router "
        f"{res['router_cpu_us_per_req']:.0f} us CPU/request, errors {res['errors']} -> {ns.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
