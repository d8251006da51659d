"""HTTP servers compared for the router's front: server CPU per request for a trivial completion.

Each server runs in its own process and answers ``POST /v1/completions`` by parsing the JSON body and
sending a small fixed JSON answer (no routing): what the HTTP layer alone costs per request. The closed-loop
load generator of :mod:`corral.bench.router_overhead` (``--concurrency`` clients, keep-alive) runs here.
Servers: aiohttp (what the router uses) and, when installed, uvicorn with httptools (raw ASGI app).

    python -m corral.bench.http_servers [--duration S] [--concurrency N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
from typing import Any

from corral.bench import router_overhead as ro

ANSWER = (
    b'{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"abcd",'
    b'"finish_reason":"length"}]}'
)


def _aiohttp(q: Any, port: int) -> None:
    ro._uvloop()
    import orjson
    from aiohttp import web

    async def handle(req: web.Request) -> web.Response:
        orjson.loads(await req.read())
        return web.Response(body=ANSWER, content_type="application/json")

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        q.put(True)
        await asyncio.Event().wait()

    asyncio.run(run())


def _uvicorn(q: Any, port: int) -> None:
    import orjson
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        orjson.loads(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": ANSWER})

    q.put(True)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _load(port: int, conc: int, duration: float) -> dict[str, Any]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def call(prompt: str, i: int) -> None:
        async with session.post(url, json={"model": "echo", "prompt": prompt, "max_tokens": 4}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(r.status)

    try:
        return await ro._closed_loop(call, conc, duration, 0.5)
    finally:
        await session.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m corral.bench.http_servers", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ns = ap.parse_args(argv)
    ro._uvloop()
    servers: list[tuple[str, Any]] = [("aiohttp", _aiohttp)]
    try:
        import httptools  # noqa: F401
        import uvicorn  # noqa: F401

        servers.append(("uvicorn-httptools", _uvicorn))
    except ImportError:
        print("uvicorn with httptools not installed: skipped")
    ctx = mp.get_context("spawn")
    for _ in range(ns.rounds):
        for name, target in servers:
            q: Any = ctx.Queue()
            port = _free_port()
            p = ctx.Process(target=target, args=(q, port), daemon=True)
            p.start()
            try:
                q.get(timeout=30)
                ro.PIDS.clear()
                ro.PIDS.update(router=[p.pid or 0], loadgen=[os.getpid()])
                r = asyncio.run(_wait_and_load(port, ns.concurrency, ns.duration))
                cpu = r["router_cpu_us_per_req"]
                print(f"{name}: {r['rps']:.0f} req/s, server {cpu:.0f} us CPU/request, errors {r['errors']}")
            finally:
                p.terminate()
                p.join(5)
    return 0


async def _wait_and_load(port: int, conc: int, duration: float) -> dict[str, Any]:
    async with asyncio.timeout(30):  # the server says it is ready just before it listens
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
    return await _load(port, conc, duration)


if __name__ == "__main__":
    raise SystemExit(main())
