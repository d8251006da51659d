"""Where the router's gRPC front spends its CPU: the shipped ``Router.Generate`` against the same handler cut
short at each stage, in the overhead benchmark's setup (2 zero-cost echo engines, 16 clients, tiny prompts).

    python -m corral.bench.grpc_breakdown [--duration S] [--out DIR]

Stages (the router process's ``RouterServicer.Generate``, replaced in that process only):

- ``answer``: a fixed response at once (grpc.aio's own cost per call in the router process);
- ``prepare``: parse, tokenize, hash and resolve the request (``_prepare``), then the fixed response;
- ``route``: ``_prepare`` and the whole route and engine round trip (``run_to_completion``), then the
  fixed response (what building the real response adds is the difference to ``shipped``);
- ``shipped``: the shipped handler; ``http``: the shipped HTTP front for comparison.

Per case: req/s, p50, the router's CPU per request, and how it splits between the main thread (the event
loop: Python and grpc's Cython layer) and grpc's own threads (C-core event engine, poller). Writes
``grpc_breakdown.json`` / ``.md`` with the git revision and dirty flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

from corral.bench import DEFAULT_OUT
from corral.bench import router_overhead as ro
from corral.bench import router_profile as rp
from corral.bench.provenance import describe, provenance

STAGES = ("answer", "prepare", "route", "shipped")


def _router_proc(engines: list[str], stage: str, q: Any, stop: Any) -> None:
    if stage != "shipped":
        from corral.router.server import grpc_api
        from corral.router.server.core import run_to_completion
        from corral.v1 import router_pb2 as rpb

        async def generate(self: Any, request: Any, context: Any) -> Any:
            if stage != "answer":
                p = await self._prepare(request, context)
                if stage == "route":
                    await run_to_completion(self.router, p, "grpc")
            return rpb.CompletionResponse(
                request_id="x", model=request.model, text="abcd", token_ids=[1, 2, 3, 4]
            )

        grpc_api.RouterServicer.Generate = generate  # type: ignore[method-assign]
    ro._router_proc(engines, "corral", q, stop)


def _threads_cpu_s(pid: int) -> tuple[float, float]:
    """(main thread, other threads) CPU seconds of ``pid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        s = (int(f[11]) + int(f[12])) / tick
        if int(t.name) == pid:
            main += s
        else:
            other += s
    return main, other


def _case(api: str, stage: str, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    q: Any = ctx.Queue()
    pe = ctx.Process(target=ro._engine_proc, args=(2, q, stop), daemon=True)
    pe.start()
    engines = q.get(timeout=60)
    pr = ctx.Process(target=_router_proc, args=(engines, stage, q, stop), daemon=True)
    pr.start()
    router = q.get(timeout=60)
    assert pr.pid is not None
    ro.PIDS.clear()
    ro.PIDS.update(engines=[pe.pid or 0], router=[pr.pid], loadgen=[os.getpid()])
    try:
        m0 = _threads_cpu_s(pr.pid)
        res = asyncio.run(rp._load(api, router, 16, duration, 1.0))
        m1 = _threads_cpu_s(pr.pid)
    finally:
        stop.set()
        for p in (pe, pr):
            p.join(10)
            if p.is_alive():
                p.kill()
    n = max(1, res["requests"])
    share = [(b - a) for a, b in zip(m0, m1, strict=True)]
    total = sum(share) or 1.0
    return {
        "case": f"{api}:{stage}",
        "rps": round(res["rps"], 1),
        "p50_ms": round(res["p50_ms"], 2),
        "router_cpu_us_per_req": round(res["router_cpu_us_per_req"], 1),
        "main_thread_share": round(share[0] / total, 3),
        "errors": res["errors"],
        "requests": n,
    }


def _markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Router gRPC front: where a request's CPU goes",
        "",
        f"{describe(doc['meta'])}; `{' '.join(doc['meta']['argv'])}`; 2 echo engines, 16 clients, "
        f"{doc['duration_s']} s per case (`corral.bench.grpc_breakdown`: the router's Generate cut short at "
        "each stage). Router CPU per request is the whole process; the main-thread share is the event loop "
        "(Python and grpc's Cython layer), the rest grpc's C-core threads.",
        "",
        "| case | req/s | p50 ms | router CPU us/req | main thread | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['case']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['router_cpu_us_per_req']:.0f} | "
            f"{r['main_thread_share']:.0%} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m corral.bench.grpc_breakdown", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per case")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = ap.parse_args(argv)
    ro._uvloop()
    results = [_case("grpc", s, ns.duration) for s in STAGES] + [_case("http", "shipped", ns.duration)]
    for r in results:
        print(r)
    doc = {"meta": provenance(), "duration_s": ns.duration, "results": results}
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "grpc_breakdown.json").write_text(json.dumps(doc, indent=1) + "\n")
    (ns.out / "grpc_breakdown.md").write_text(_markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
