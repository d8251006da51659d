"""Overload benchmark (``corral bench load``): admission control under 2x the fleet's capacity.

A small real fleet on loopback: sim engine replicas (``--replicas``, H100 profile in wall-clock time, at
most ``--max-seqs`` sequences running each, like vLLM's ``max_num_seqs``) behind gRPC endpoints in one
process, a Corral router (OpenAI HTTP) in another, built from a RoutingPolicy (:data:`POLICY`: a small
per-replica queue bound, so the backlog waits in the router's fair queue, and two tenants of weights 3
and 1) through the same ``router_settings`` as every router; the load generator runs in this process.

1. **Capacity**: a closed loop with enough clients to keep every replica full measures completions/s.
2. **Overload**: Poisson arrivals at ``--factor`` (2) x that capacity for ``--duration`` seconds, half
   from each tenant. Every request must end with a complete response or a clean 429 with
   ``Retry-After``: anything else (other status, connection error, client timeout, a 429 without
   ``Retry-After``) is **lost**. Reported: accepted (admitted), rejected (by reason, from the router's
   metrics), completed, lost, latency of accepted requests (P50/P99), and fairness: each tenant's share
   of the completed throughput against its share of the weights.
3. **Leak check**: after the run the router's admission gauges (waiting, in flight) and its per-replica
   outstanding requests must all be back to 0.

Writes ``DIR/load.{json,md}`` (default DIR: ./corral-bench/)::

    corral bench load [--short] [--duration S] [--factor F] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from corral.bench import DEFAULT_OUT
from corral.bench.provenance import describe, provenance

MODEL = "llama-8b"
TENANTS = {"gold": 3, "bronze": 1}  # tenant -> weight
KEYS = {f"key-{t}": t for t in TENANTS}  # API key -> tenant (the bench's own, loopback only)
POLICY: dict[str, Any] = {
    "poolRef": "load",
    "strategy": "corral",
    "load": {"maxQueueRequestsPerReplica": 2},
    "admission": {
        "maxWaiting": 64,
        "maxWaitMs": 1000,
        "tenants": [{"name": t, "weight": w} for t, w in TENANTS.items()],
    },
}
"""The RoutingPolicy spec the router runs (shipped with the benchmark)."""


# ---- server processes -------------------------------------------------------------------------------------
def _engine_proc(n: int, max_seqs: int, q: Any, stop: Any) -> None:
    from corral.serve.endpoint import EngineEndpoint
    from corral.serve.endpoint.sim import SimEndpointEngine

    async def run() -> None:
        eps = []
        for i in range(n):
            eng = SimEndpointEngine.create("H100", f"sim-{i}", MODEL, max_num_seqs=max_seqs)
            eps.append(await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05))
        q.put([e.address for e in eps])
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for e in eps:
            await e.stop(0)

    asyncio.run(run())


def _router_proc(engines: list[str], policy: dict[str, Any], q: Any, stop: Any, ask: Any) -> None:
    """The router; answers each item put on ``ask`` with its Prometheus metrics text on ``q`` (read in
    process, whatever /metrics requires)."""
    from corral.api.routingpolicy import RoutingPolicySpec
    from corral.router.server import RouterConfig, RouterServer
    from corral.router.settings import router_settings

    settings = router_settings(RoutingPolicySpec.model_validate(policy))

    async def run() -> None:
        srv = RouterServer(engines, RouterConfig.from_settings(settings))
        srv.set_api_keys(dict(KEYS))
        await srv.start("127.0.0.1", 0, 0)
        await srv.wait_for_replicas(len(engines), 30)
        q.put(srv.http_url)
        while not stop.is_set():
            await asyncio.sleep(0.05)
            while not ask.empty():
                ask.get()
                q.put(srv.router.metrics.render().decode())
        await srv.stop(0)

    asyncio.run(run())


# ---- load generation -----------------------------------------------------------------------------------
def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


class Outcome:
    """What happened to each request (every request gets exactly one outcome)."""

    def __init__(self) -> None:
        self.kinds: Counter[tuple[str, str]] = Counter()  # (tenant, kind)
        self.latency: list[float] = []  # completed requests, seconds
        self.retry_after: list[float] = []  # of clean 429s
        self.examples: dict[str, str] = {}  # kind -> one message (for the report)

    def add(self, tenant: str, kind: str, detail: str = "") -> None:
        self.kinds[tenant, kind] += 1
        if detail and kind not in self.examples:
            self.examples[kind] = detail[:300]

    def count(self, kind: str, tenant: str | None = None) -> int:
        return sum(n for (t, k), n in self.kinds.items() if k == kind and tenant in (None, t))


async def _request(session: Any, url: str, tenant: str, i: int, max_tokens: int, out: Outcome) -> bool:
    """One request; its outcome goes to ``out``. Returns whether it completed."""
    import aiohttp

    body = {"model": MODEL, "prompt": f"tenant {tenant} asks question {i}: " + "why " * 40,
            "max_tokens": max_tokens}  # fmt: skip
    headers = {"Authorization": f"Bearer key-{tenant}"}
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            text = await resp.text()
            if resp.status == 200:
                doc = json.loads(text)
                choice = doc["choices"][0]
                if choice.get("finish_reason") and doc["usage"]["completion_tokens"] >= 1:
                    out.latency.append(time.perf_counter() - t0)
                    out.add(tenant, "completed")
                    return True
                else:
                    out.add(tenant, "lost_incomplete", text)
            elif resp.status == 429:
                ra = resp.headers.get("Retry-After", "")
                if ra.isdigit() and int(ra) >= 1:
                    out.retry_after.append(float(ra))
                    out.add(tenant, "rejected_429", text)
                else:
                    out.add(tenant, "lost_429_without_retry_after", text)
            else:
                out.add(tenant, f"lost_http_{resp.status}", text)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, KeyError, IndexError) as e:
        out.add(tenant, "lost_" + type(e).__name__, str(e))
    return False


async def _capacity(
    url: str, clients: int, duration: float, warmup: float, max_tokens: int
) -> dict[str, Any]:
    import aiohttp

    out = Outcome()
    done_in_window = 0
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration
    names = list(TENANTS)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as s:

        async def client(c: int) -> None:
            nonlocal done_in_window
            i = c
            while time.perf_counter() < t_end:
                ok = await _request(s, url, names[c % len(names)], i, max_tokens, out)
                if ok and t_measure <= time.perf_counter() <= t_end:
                    done_in_window += 1
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
    return {
        "clients": clients,
        "duration_s": duration,
        "completed_per_s": done_in_window / duration,
        "rejected": out.count("rejected_429"),
        "p50_ms": _pct(out.latency, 50) * 1e3,
        "p99_ms": _pct(out.latency, 99) * 1e3,
    }


async def _overload(url: str, rate: float, duration: float, max_tokens: int, seed: int) -> dict[str, Any]:
    import aiohttp

    out = Outcome()
    sent: Counter[str] = Counter()
    tasks: list[asyncio.Task[bool]] = []
    per_tenant = rate / len(TENANTS)
    t_start = time.perf_counter()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as s:

        async def arrivals(tenant: str, rng: random.Random) -> None:
            t = t_start
            i = 0
            while True:
                t += rng.expovariate(per_tenant)
                if t >= t_start + duration:
                    return
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                sent[tenant] += 1
                tasks.append(asyncio.create_task(_request(s, url, tenant, i, max_tokens, out)))
                i += 1

        await asyncio.gather(*(arrivals(t, random.Random(seed + k)) for k, t in enumerate(TENANTS)))
        await asyncio.gather(*tasks)  # every request ends: a response, a 429, or (lost) a client error
    wall = time.perf_counter() - t_start
    wsum = sum(TENANTS.values())
    completed = out.count("completed")
    tenants = {}
    for t, w in TENANTS.items():
        c = out.count("completed", t)
        tenants[t] = {
            "weight": w,
            "sent": sent[t],
            "completed": c,
            "rejected_429": out.count("rejected_429", t),
            "completed_per_s": c / duration,
            "share": c / completed if completed else 0.0,
            "weight_share": w / wsum,
        }
    lost_kinds = {k: n for k, n in Counter(k for (_, k), n in out.kinds.items() for _ in range(n)).items()
                  if k.startswith("lost_")}  # fmt: skip
    return {
        "offered_per_s": rate,
        "duration_s": duration,
        "wall_s": wall,
        "sent": sum(sent.values()),
        "completed": completed,
        "rejected_429": out.count("rejected_429"),
        "lost": sum(lost_kinds.values()),
        "lost_kinds": lost_kinds,
        "lost_examples": {k: v for k, v in out.examples.items() if k.startswith("lost_")},
        "reject_example": out.examples.get("rejected_429", ""),
        "retry_after_s": {"min": min(out.retry_after, default=0), "max": max(out.retry_after, default=0)},
        "accepted_p50_ms": _pct(out.latency, 50) * 1e3,
        "accepted_p99_ms": _pct(out.latency, 99) * 1e3,
        "tenants": tenants,
    }


_SAMPLE = re.compile(r"^(corral_[a-z_]+?)(?:_total)?\{([^}]*)\} ([-+0-9.eE]+|NaN)$")


class RouterProbe:
    """Asks the router process for its metrics (see :func:`_router_proc`)."""

    def __init__(self, ask: Any, q: Any) -> None:
        self.ask, self.q = ask, q

    def text(self) -> str:
        self.ask.put(1)
        return str(self.q.get(timeout=30))


def _router_metrics(probe: RouterProbe) -> dict[str, dict[str, float]]:
    """corral_admission_* and corral_replica_outstanding samples: name -> labels -> value."""
    text = probe.text()
    got: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and (m.group(1).startswith("corral_admission") or m.group(1) == "corral_replica_outstanding"):
            got.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return got


def _leaks(probe: RouterProbe, timeout: float = 10.0) -> dict[str, Any]:
    """The router's held slots after the run (waiting, in flight, outstanding): all must be 0."""
    t_end = time.monotonic() + timeout
    while True:
        m = _router_metrics(probe)
        held = {f"{name}{{{lab}}}": v for name in ("corral_admission_waiting", "corral_admission_inflight",
                "corral_replica_outstanding") for lab, v in m.get(name, {}).items() if v}  # fmt: skip
        if not held or time.monotonic() > t_end:
            return {"held": held, "metrics": m}
        time.sleep(0.1)


# ---- report ----------------------------------------------------------------------------------------------
def _markdown(doc: dict[str, Any]) -> str:
    cap, ov, cfg = doc["capacity"], doc["overload"], doc["config"]
    rej = doc["router_rejected"]
    lines = [
        "# Overload: admission control at 2x capacity",
        "",
        f"`corral bench load{' --short' if cfg['short'] else ''}` ({describe(doc['meta'])}; "
        f"{doc['machine']['cpus']} CPUs shared with other work, Python {doc['machine']['python']}). "
        f"{cfg['replicas']} sim H100 replicas (wall clock, max_num_seqs {cfg['max_seqs']}) behind a Corral "
        f"router on loopback, RoutingPolicy `load.maxQueueRequestsPerReplica: "
        f"{POLICY['load']['maxQueueRequestsPerReplica']}`, `admission: maxWaiting "
        f"{POLICY['admission']['maxWaiting']}, maxWaitMs {POLICY['admission']['maxWaitMs']}`, tenants "
        + ", ".join(f"`{t}` weight {w}" for t, w in TENANTS.items())
        + f"; requests of ~{cfg['prompt_tokens_approx']} prompt tokens and max_tokens {cfg['max_tokens']}, "
        "non-streaming OpenAI HTTP.",
        "",
        f"**Capacity** (closed loop, {cap['clients']} clients, {cap['duration_s']:g} s): "
        f"**{cap['completed_per_s']:.1f} completions/s** (P50 {cap['p50_ms']:.0f} ms, "
        f"P99 {cap['p99_ms']:.0f} ms).",
        "",
        f"**Overload**: Poisson arrivals at {doc['factor']:g} x capacity = {ov['offered_per_s']:.1f} req/s "
        f"for {ov['duration_s']:g} s, half from each tenant.",
        "",
        "| sent | accepted | completed | rejected (429 + Retry-After) | **lost** | accepted P50 "
        "| accepted P99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {ov['sent']} | {doc['router_admitted']} | {ov['completed']} | {ov['rejected_429']} | "
        f"**{ov['lost']}** | {ov['accepted_p50_ms']:.0f} ms | {ov['accepted_p99_ms']:.0f} ms |",
        "",
        "Rejections by reason (router metrics `corral_admission_rejected`): "
        + (", ".join(f"{k} {int(v)}" for k, v in sorted(rej.items()) if v) or "none")
        + f". Retry-After given: {ov['retry_after_s']['min']:g}-{ov['retry_after_s']['max']:g} s.",
        "",
        "| tenant | weight | sent | completed | rejected | completed/s | share of throughput "
        "| share of weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, r in ov["tenants"].items():
        lines.append(
            f"| {t} | {r['weight']} | {r['sent']} | {r['completed']} | {r['rejected_429']} | "
            f"{r['completed_per_s']:.1f} | {r['share']:.2f} | {r['weight_share']:.2f} |"
        )
    leaks = doc["leaks"]["held"]
    lines += [
        "",
        f"After the run the router held **{len(leaks)}** slots (admission waiting / in flight, replica "
        "outstanding): " + ("none." if not leaks else ", ".join(f"{k}={v:g}" for k, v in leaks.items())),
        "",
        "Lost = any request that ended other than with a complete response or a 429 carrying Retry-After "
        "(another status, a connection error, a client timeout of 60 s). The fair share is what weighted "
        "fair queueing gives two backlogged tenants; a tenant offering less than its share gets all it "
        "offers.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench load", description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="the CI mode: 2 s capacity, 4 s overload")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    ap.add_argument("--capacity-s", type=float, default=6.0, help="seconds of the capacity measurement")
    ap.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity")
    ap.add_argument("--replicas", type=int, default=2, help="sim engine replicas")
    ap.add_argument("--max-seqs", type=int, default=2, help="sequences each replica runs at once")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default ./{DEFAULT_OUT})")
    ns = ap.parse_args(argv)
    if ns.short:
        ns.duration, ns.capacity_s = 4.0, 2.0
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    q: Any = ctx.Queue()
    ask: Any = ctx.Queue()
    probe = RouterProbe(ask, q)
    procs = [ctx.Process(target=_engine_proc, args=(ns.replicas, ns.max_seqs, q, stop), daemon=True)]
    procs[0].start()
    try:
        engines = q.get(timeout=120)
        procs.append(ctx.Process(target=_router_proc, args=(engines, POLICY, q, stop, ask), daemon=True))
        procs[1].start()
        url = q.get(timeout=120)
        print(f"engines {engines}  router {url}", flush=True)
        slots = ns.replicas * (ns.max_seqs + POLICY["load"]["maxQueueRequestsPerReplica"])
        cap = asyncio.run(_capacity(url + "/v1/completions", 2 * slots, ns.capacity_s, 1.0, ns.max_tokens))
        print(f"capacity: {cap['completed_per_s']:.1f} completions/s", flush=True)
        before = _router_metrics(probe)
        rate = max(1.0, ns.factor * cap["completed_per_s"])
        ov = asyncio.run(_overload(url + "/v1/completions", rate, ns.duration, ns.max_tokens, ns.seed))
        leaks = _leaks(probe)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    m = leaks["metrics"]
    rejected: Counter[str] = Counter()  # in the overload phase (the metrics count from the router's start)
    for lab, v in m.get("corral_admission_rejected", {}).items():
        reason = re.search(r'reason="([^"]+)"', lab)
        v0 = before.get("corral_admission_rejected", {}).get(lab, 0.0)
        rejected[reason.group(1) if reason else "?"] += int(v - v0)
    adm_now, adm_before = m.get("corral_admission_admitted", {}), before.get("corral_admission_admitted", {})
    admitted = int(sum(adm_now.values()) - sum(adm_before.values()))
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {
            "short": ns.short,
            "replicas": ns.replicas,
            "max_seqs": ns.max_seqs,
            "max_tokens": ns.max_tokens,
            "prompt_tokens_approx": 50,
            "seed": ns.seed,
            "policy": POLICY,
        },
        "factor": ns.factor,
        "capacity": cap,
        "overload": ov,
        "router_admitted": admitted,  # in the overload phase, counted by the router
        "router_rejected": dict(rejected),
        "leaks": {"held": leaks["held"]},
        "meta": provenance(),
    }
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "load.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0 if ov["lost"] == 0 and not leaks["held"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
