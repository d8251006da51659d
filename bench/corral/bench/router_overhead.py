"""Router overhead benchmark: what one Corral router process adds over calling an engine directly.

Zero-cost engines (:class:`corral.serve.endpoint.EchoEngine`, answering at once) run in their own process
behind gRPC endpoints; the router (policy ``corral`` by default, so prefix affinity is on, with tiny
prompts that share prefixes) runs in another; a closed-loop load generator with ``--concurrency`` clients
runs in this process. Cases, measured side by side in one run:

- ``direct_grpc``: client -> engine endpoint (Engine.Generate stream), round-robin over the engines;
- ``router_grpc``: client -> router (Router.Generate, unary) -> engine;
- ``router_http``: client -> router (POST /v1/completions, JSON) -> engine;
- ``router_grpc_wN`` / ``router_http_wN`` (``--workers``, at ``--concurrency`` only): the standalone router
  ``python -m corral.router.server --workers N`` (N processes on one port, SO_REUSEPORT), one gRPC channel
  (connection) per client so that the kernel spreads them over the workers;
- ``ray_serve_http`` (``--ray``): client -> Serve HTTP proxy -> ingress replica -> DeploymentHandle ->
  echo replica, the Serve-native path, for reference.

Each case runs once with 1 client (unloaded latency) and once with ``--concurrency`` clients (latency
under load and max throughput). ``router CPU us/req`` is the CPU time of every router process (the workers
and their parent) per request: steady on a busy machine, unlike req/s. Writes
``DIR/router_overhead.{json,md}`` (default DIR: ./corral-bench/).

    python -m corral.bench.router_overhead [--quick] [--ray] [--duration S] [--concurrency N] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from corral.bench import DEFAULT_OUT
from corral.bench.provenance import describe, provenance

MODEL = "echo"


def _uvloop() -> str:
    if os.environ.get("CORRAL_BENCH_LOOP") == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# ---- server processes -------------------------------------------------------------------------------------
def _engine_proc(n: int, q: Any, stop: Any) -> None:
    _uvloop()
    from corral.serve.endpoint import EchoEngine, EngineEndpoint

    async def run() -> None:
        eps = []
        for i in range(n):
            eng = EchoEngine(replica_id=f"echo-{i}", model=MODEL, gpu_class="H100", profile="H100")
            eps.append(await EngineEndpoint.start(eng, "127.0.0.1", 0))
        q.put([e.address for e in eps])
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for e in eps:
            await e.stop(0)

    asyncio.run(run())


def _router_proc(engines: list[str], policy: str, q: Any, stop: Any) -> None:
    _uvloop()
    from dataclasses import replace

    from corral.router.server import RouterConfig, RouterServer
    from corral.router.settings import router_settings

    # The shipped defaults (default RoutingPolicy, explain as shipped); only the strategy may differ.
    shipped = router_settings(None)
    settings = shipped if policy == shipped.strategy else replace(shipped, strategy=policy, policy_params={})

    async def run() -> None:
        srv = RouterServer(engines, RouterConfig.from_settings(settings))
        await srv.start("127.0.0.1", 0, 0)
        await srv.wait_for_replicas(len(engines), 20)
        q.put((srv.grpc_address, srv.http_url))
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await srv.stop(0)

    asyncio.run(run())


# ---- load generation -----------------------------------------------------------------------------------
def _prompts(n: int = 64) -> list[str]:
    # tiny prompts (~48 tokens = 3 blocks): 8 shared prefixes x distinct suffixes
    return [f"system prompt number {i % 8:02d} for the tenant; " + f"question {i:04d}?" for i in range(n)]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def _cpu_s(pids: list[int]) -> float:
    """User+system CPU seconds of processes (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


PIDS: dict[str, list[int]] = {}  # role -> its processes (the router: the workers and their parent)


async def _closed_loop(call: Any, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    prompts = _prompts()

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await call(prompts[i % len(prompts)], i)
            except Exception:
                errors += 1
            t1 = time.perf_counter()
            if t0 >= t_measure:
                lat.append(t1 - t0)
            i += concurrency

    async def cpu_mark() -> dict[str, float]:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        return {k: _cpu_s(pids) for k, pids in PIDS.items()}

    mark = asyncio.create_task(cpu_mark())
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t_measure
    cpu0 = await mark
    cpu = {k: _cpu_s(pids) - cpu0[k] for k, pids in PIDS.items()}
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": _pct(lat, 50) * 1e3,
        "p90_ms": _pct(lat, 90) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        # CPU seconds each process used per second of the run, and the router's CPU per request
        "cpu_util": {k: round(v / wall, 3) for k, v in cpu.items()},
        "router_cpu_us_per_req": cpu.get("router", 0.0) / len(lat) * 1e6 if lat else float("nan"),
    }


async def _run_cases(
    engines: list[str],
    router: tuple[str, str],
    ray_url: str | None,
    conc: int,
    duration: float,
    warmup: float,
    only_ray: bool = False,
) -> list[dict[str, Any]]:
    import aiohttp
    import grpc
    from corral.v1 import engine_pb2 as epb
    from corral.v1 import engine_pb2_grpc as epb_grpc
    from corral.v1 import router_pb2 as rpb
    from corral.v1 import router_pb2_grpc as rpb_grpc

    engine_stubs = [epb_grpc.EngineStub(grpc.aio.insecure_channel(a)) for a in engines]
    router_stub = rpb_grpc.RouterStub(grpc.aio.insecure_channel(router[0]))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))

    from corral.router.tokenizer import SIM_TOKENIZER

    async def direct(prompt: str, i: int) -> None:
        ids = SIM_TOKENIZER.encode(prompt)  # what the router sends the engines for the same text
        req = epb.GenerateRequest(request_id=f"d{i}", model=MODEL, prompt_token_ids=ids, max_tokens=4)
        async for _ in engine_stubs[i % len(engine_stubs)].Generate(req):
            pass

    async def via_grpc(prompt: str, i: int) -> None:
        await router_stub.Generate(rpb.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=4))

    url = router[1] + "/v1/completions"

    async def via_http(prompt: str, i: int) -> None:
        async with session.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 4}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(r.status)

    async def via_ray(prompt: str, i: int) -> None:
        assert ray_url is not None
        async with session.post(ray_url, json={"model": MODEL, "prompt": prompt, "max_tokens": 4}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(r.status)

    cases: list[tuple[str, Any]] = [
        ("direct_grpc", direct),
        ("router_grpc", via_grpc),
        ("router_http", via_http),
    ]
    if only_ray:
        cases = [("ray_serve_http", via_ray)]
    out = []
    for c in sorted({1, conc}):
        for name, fn in cases:
            res = await _closed_loop(fn, c, duration, warmup)
            res["case"] = name
            out.append(res)
            _print(res)
    await session.close()
    return out


def _print(res: dict[str, Any]) -> None:
    print(
        f"  {res['case']:15s} c={res['concurrency']:3d}  {res['rps']:8.0f} req/s  p50 {res['p50_ms']:7.2f} ms"
        f"  p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}  cpu {res['cpu_util']}"
        f"  router {res['router_cpu_us_per_req']:.0f} us/req",
        flush=True,
    )


async def _workers_ready(url: str, engines: int, workers: int, timeout: float = 30.0) -> None:
    """Until /ready, asked over many new connections (so every worker answers some), counts every engine."""
    import aiohttp

    async with asyncio.timeout(timeout):
        while True:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                ok = 0
                for _ in range(8 * workers):
                    async with s.get(url + "/ready") as r:
                        ok += r.status == 200 and (await r.json())["replicas"] == engines
                if ok == 8 * workers:
                    return
            await asyncio.sleep(0.2)


async def _run_worker_cases(
    grpc_addr: str, http_url: str, conc: int, duration: float, warmup: float, workers: int
) -> list[dict[str, Any]]:
    """The router with ``workers`` processes: every client on its own connection (gRPC: its own channel)."""
    import aiohttp
    import grpc
    from corral.v1 import router_pb2 as rpb
    from corral.v1 import router_pb2_grpc as rpb_grpc

    opts = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, not one shared
    channels = [grpc.aio.insecure_channel(grpc_addr, options=opts) for _ in range(conc)]
    stubs = [rpb_grpc.RouterStub(ch) for ch in channels]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = http_url + "/v1/completions"

    async def via_grpc(prompt: str, i: int) -> None:
        await stubs[i % conc].Generate(rpb.CompletionRequest(model=MODEL, prompt=prompt, max_tokens=4))

    async def via_http(prompt: str, i: int) -> None:
        async with session.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 4}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(r.status)

    out = []
    for name, fn in ((f"router_grpc_w{workers}", via_grpc), (f"router_http_w{workers}", via_http)):
        res = await _closed_loop(fn, conc, duration, warmup)
        res["case"] = name
        res["workers"] = workers
        out.append(res)
        _print(res)
    await session.close()
    for ch in channels:
        await ch.close()
    return out


def _measure_workers(engines: list[str], ns: argparse.Namespace) -> list[dict[str, Any]]:
    """Each worker count in ``ns.workers``: start ``python -m corral.router.server --workers N``, measure."""
    from corral.bench.procs import start_router

    out: list[dict[str, Any]] = []
    single = PIDS["router"]
    for n in ns.workers:
        extra = ["--workers", str(n)] + (["--policy", ns.policy] if ns.policy != "corral" else [])
        rp = start_router(engines, stale_after_s=1.0, extra=extra, name=f"router-w{n}")
        try:
            line = rp.proc.match.string
            pids = [int(p) for p in line.split("(pids ")[1].split(")")[0].split(",")]
            PIDS["router"] = [rp.proc.pid, *pids]
            asyncio.run(_workers_ready(rp.http_url, len(engines), n))
            out += asyncio.run(
                _run_worker_cases(rp.grpc_address, rp.http_url, ns.concurrency, ns.duration, ns.warmup, n)
            )
        finally:
            rp.proc.terminate()
            PIDS["router"] = single
    return out


# ---- Ray Serve reference path ----------------------------------------------------------------------------
def _start_ray_serve() -> str:
    import socket

    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(max_ongoing_requests=64)
    class Echo:
        async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            text = body["prompt"][-4:]
            return {"choices": [{"text": text, "finish_reason": "length"}]}

    @serve.deployment(max_ongoing_requests=64)
    class Ingress:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            return await self.echo.remote(body)  # type: ignore[no-any-return]

    serve.run(Ingress.bind(Echo.bind()), name="echo", route_prefix="/", blocking=False)  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{port}/"


def _stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# ---- report -----------------------------------------------------------------------------------------------
def _summary(results: list[dict[str, Any]], conc: int) -> dict[str, Any]:
    def get(case: str, c: int) -> dict[str, Any] | None:
        return next((r for r in results if r["case"] == case and r["concurrency"] == c), None)

    s: dict[str, Any] = {}
    for c in sorted({1, conc}):
        d = get("direct_grpc", c)
        for case in ("router_grpc", "router_http", "ray_serve_http"):
            r = get(case, c)
            if d and r:
                s[f"{case}_extra_p50_ms_c{c}"] = r["p50_ms"] - d["p50_ms"]
                s[f"{case}_extra_p99_ms_c{c}"] = r["p99_ms"] - d["p99_ms"]
    s["router_max_rps_grpc"] = max((r["rps"] for r in results if r["case"] == "router_grpc"), default=0.0)
    s["router_max_rps_http"] = max((r["rps"] for r in results if r["case"] == "router_http"), default=0.0)
    d = get("direct_grpc", conc)
    for case in ("router_grpc", "router_http"):
        r = get(case, conc)
        if d and r and d["rps"]:
            s[f"{case}_rps_vs_direct_c{conc}"] = r["rps"] / d["rps"]
            s[f"{case}_cpu_us_per_req_c{conc}"] = r["router_cpu_us_per_req"]
    for r in results:
        if "workers" in r:
            s[f"{r['case']}_rps"] = r["rps"]
    s["goal"] = (
        "one router process: >= 0.8x direct req/s over HTTP and gRPC at 16 clients, <= +1.5 ms p50, "
        "<= 150 us router CPU per request, gRPC not slower than HTTP"
    )
    return s


READING = (
    "Reading: `router CPU us/req` (all router processes' CPU time per request) is the figure that holds on "
    "a busy machine; req/s and latency under load depend on what else runs on the same cores: here the "
    "engines, the load generator (one Python process, itself near one core at the direct case's rate) and "
    "the router share them, so extra router workers can only add throughput when cores are free (each "
    "worker also keeps its own engine event streams, so CPU per request is higher with more workers on 2 "
    "cores). The "
    "targets (issue 13): a single router process at >= 0.8x direct req/s over HTTP and gRPC at 16 clients, "
    "<= +1.5 ms p50 over direct, <= 150 us router CPU per request, gRPC no slower than HTTP."
)

PROFILE = """## Profile (where a request's router CPU goes)

Flame graphs of the router process under the 16-client load (py-spy at 250 samples/s, `python -m
corral.bench.router_profile --api grpc|http --out FILE`): `router_flame_http_before.svg` /
`router_flame_grpc_before.svg` (revision e57898f: one `Engine.Generate` gRPC call per request) and
`router_flame_http.svg` / `router_flame_grpc.svg` (now). Shares are of all samples of the router process;
CPU per request from the same runs (busy shared 2-core machine, one run each, so +-15%).

- Before, HTTP (511-628 us CPU/request): the router's own gRPC client call to the engine was most of it:
  `UnaryStreamCall._send_unary_request` 39%, reading its stream 13%, grpc's poller thread 7%; aiohttp's
  request handling and response writing ~20%; the policy decision ~4%, hashing ~1%, metrics and the explain
  record < 1% each. The engines' event streams and load samples (10 per second per engine) were < 1%: the
  per-engine growth the issue saw was not in the event path (2, 4, 8 engines: 607, 571, 575 us/request).
- Step 1, requests multiplexed over one long-lived `Engine.GenerateMux` gRPC call per engine
  (`corral.router.engine_mux`, engine side `corral.serve.endpoint.mux`; opens written in the same loop
  iteration share a message, about 4 per write here; the engine batches the chunks of all streams per
  write): HTTP 283-308 us/request, the multiplexed call's writes still ~17% (a gRPC operation each).
- Step 2, the same messages over the engine's framed TCP port (`EngineInfo.stream_address`,
  `corral.serve.endpoint.framed`: a length prefix, one transport write per batch; plaintext endpoints only,
  TLS endpoints keep GenerateMux over gRPC): HTTP 231-248 us/request. What is left: aiohttp's request
  handling and response write ~45% of the samples, the event loop itself ~23%, the engine write (a send
  syscall) ~15%, the request path in Python (parse, tokenize, hash, decide, account) ~15%. With 2, 4, 8
  engines: 241, 272, 307 us/request (`--engines N`; at 8 the `corral` policy's decision, which prices every
  candidate and keeps their cost terms for Explain, is ~12% of the samples). For scale (`python -m
  corral.bench.http_servers`): a bare aiohttp handler parsing the same JSON and answering costs 56-60
  us/request here, uvicorn with httptools 35-44 us: another HTTP server would save ~20 us of the ~240.
- Per engine, without requests (`--idle --engines N`): the router spends 10, 18, 38 ms of CPU per second
  following 2, 8, 32 engines (one event-stream message per engine every 0.1 s: ~0.1-0.2 ms each, nearly all
  in grpc.aio's message handling and its poller thread, < 10% in Corral's event code). Not a per-request
  cost, but it grows with the fleet and is paid by every router worker; carrying the event stream over the
  framed connection as well is the next step.
- gRPC (before 780-903, now 460-600 us CPU/request): the router's own grpc.aio server dominates (C-core
  work run by the event loop ~60% of the samples, grpc's poller thread ~9%); Corral's Python request path is
  ~17%. `grpc_breakdown.md` (`python -m corral.bench.grpc_breakdown`) cuts the shipped Generate short at
  each stage in this setup: answering at once costs the router process ~165 us per call (grpc.aio alone;
  the same as a bare grpc.aio server, measured at 150-170 us), parsing/tokenizing/hashing adds ~65 us, and
  the route with its engine round trip adds ~250 us, about twice what the same route costs under the HTTP
  front (whose whole request is ~190 us); the main thread is then saturated (>80% of the process's CPU), so
  the extra is in grpc.aio's Cython layer run by the event loop whenever a handler suspends on other I/O,
  not in Corral's Python (py-spy: the handler's Python frames are ~80 us per request). What would fix it
  structurally is to take grpc.aio off the routing loop (a gRPC front process forwarding over the framed
  protocol the engines already speak); not done, so the gRPC front stays slower than HTTP.
"""


def _workers(doc: dict[str, Any]) -> str:
    w = doc.get("workers") or []
    return "measured: " + ", ".join(str(n) for n in w) if w else "not measured"


def _markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Router overhead",
        "",
        f"Machine: {doc['machine']['cpus']} CPU(s), {doc['machine']['platform']}, Python "
        f"{doc['machine']['python']}, loop {doc['machine']['loop']}, {describe(doc['meta'])}. "
        f"Engines: {doc['engines']} zero-cost "
        f"echo replicas (gRPC endpoints, one process); router: one process, policy `{doc['policy']}` "
        f"(`router_*_wN`: N worker processes on one port, {_workers(doc)}); "
        "load generator: closed loop in a third process. Tiny prompts (~48 tokens, 8 shared prefixes), "
        f"max_tokens 4. {doc['duration_s']} s per case after {doc['warmup_s']} s warm-up. All processes "
        "share the same cores, so the router competes with the load generator and the engines for CPU; "
        "`router CPU us/req` is the router processes' CPU time per request (1e6 / it = req/s one core "
        "could carry).",
        "",
        "| case | clients | req/s | p50 ms | p90 ms | p99 ms | errors | router CPU us/req | CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['case']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | {r['router_cpu_us_per_req']:.0f} | "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_util"].items())
            + " |"
        )
    lines += ["", "Summary (router minus direct in ms; req/s ratios to direct; CPU in us per request):", ""]
    for k, v in doc["summary"].items():
        lines.append(f"- `{k}`: {v:.2f}" if isinstance(v, float) else f"- `{k}`: {v}")
    lines += ["", READING, "", PROFILE]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (1 s per case)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per case")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--engines", type=int, default=2, help="zero-cost engine replicas")
    ap.add_argument("--policy", default="corral")
    ap.add_argument("--ray", action="store_true", help="also measure the Ray Serve-native path (starts Ray)")
    ap.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",") if x.strip() and int(x) > 1],
        default=[2, 4],
        help="router worker process counts to measure besides the single process (default 2,4; '' = none)",
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default ./{DEFAULT_OUT})")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.duration, ns.warmup = 1.0, 0.3
    loop_name = _uvloop()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    q: Any = ctx.Queue()
    procs = [ctx.Process(target=_engine_proc, args=(ns.engines, q, stop), daemon=True)]
    procs[0].start()
    engines = q.get(timeout=60)
    procs.append(ctx.Process(target=_router_proc, args=(engines, ns.policy, q, stop), daemon=True))
    procs[1].start()
    router = q.get(timeout=60)
    PIDS.update(engines=[procs[0].pid or 0], router=[procs[1].pid or 0], loadgen=[os.getpid()])
    ray_url = None
    try:
        print(f"engines {engines}  router grpc {router[0]} http {router[1]}", flush=True)
        results = asyncio.run(_run_cases(engines, router, None, ns.concurrency, ns.duration, ns.warmup))
        if ns.workers:
            results += _measure_workers(engines, ns)
        if ns.ray:  # after the Corral cases: Ray's own processes would otherwise steal their CPU
            try:
                ray_url = _start_ray_serve()
            except Exception as e:  # Ray is optional here
                print(f"Ray Serve path skipped: {e}", file=sys.stderr)
            if ray_url:
                results += asyncio.run(
                    _run_cases(
                        engines, router, ray_url, ns.concurrency, ns.duration, ns.warmup, only_ray=True
                    )
                )
    finally:
        stop.set()
        if ray_url:
            _stop_ray()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loop": loop_name,
        },
        "engines": ns.engines,
        "policy": ns.policy,
        "workers": ns.workers,
        "duration_s": ns.duration,
        "warmup_s": ns.warmup,
        "results": results,
        "summary": _summary(results, ns.concurrency),
        "meta": provenance(),
    }
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "router_overhead.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
