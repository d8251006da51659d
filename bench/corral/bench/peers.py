"""``corral bench peers``: Corral's router side by side with ``sglang-router`` and ``vllm-router``.

Every router fronts the *same* fake vLLM-shaped workers (:mod:`corral.serve.fakevllm`: OpenAI endpoints,
``/metrics``, an LRU prefix cache with service time proportional to uncached tokens, a concurrency limit),
started once in their own process; each router runs in its own process with its shipped defaults
(Corral: ``corral router --backend URL ...`` with the CRD-default RoutingPolicy; the peers: their own
default policy, ``cache_aware``). A closed-loop client (``--concurrency`` streams) drives the same requests
through each, after the workers' caches and counters are reset:

- ``conversation``: the shipped Mooncake conversation trace sample, replayed as text (each 512-token
  ``hash_id`` block becomes ``--block-tokens`` tokens of text unique to that id, so shared ids are shared
  prefixes; outputs capped at ``--max-tokens``);
- ``shared_prefix``: ``--groups`` long system prompts, each request one of them plus a unique question;
- ``no_reuse``: unique prompts (no prefix to find);
- ``hop``: tiny prompts, one output token: the hop's own cost, also measured straight to the workers
  (``direct``): ``hop_overhead_ms`` = a router's TTFT p50 minus direct's with one client,
  ``hop_overhead_loaded_ms`` the same with ``--concurrency`` clients.

Per router and workload: throughput (req/s), TTFT p50/p99 (first streamed event, client side), prefix hit
rate (the workers' own counters: cached / prompt tokens), load imbalance (max / mean requests per worker),
errors. TTFT percentiles leave out the first ``--warmup`` requests (default 2 x concurrency: the cold start,
all streams at once on empty caches, the same for every router; ``ttft_p99_with_warmup_ms`` keeps them).
Written to ``DIR/peers.json`` / ``peers.md`` / ``peers.png`` (default DIR ``./corral-bench/``).

Nothing is installed here: a peer is run when ``sglang_router`` / ``vllm_router`` is importable by this
Python or its command (``sglang-router``, ``vllm-router``) is on ``PATH`` or in ``--peer-bin DIR``
(``pip install 'corral[peers]'``); otherwise the results say it was not installed.

    corral bench peers [--quick] [--peers corral,sglang-router,vllm-router] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

from corral.bench import DATA, DEFAULT_OUT
from corral.bench.provenance import describe, provenance

MODEL = "llama-8b"
PEERS = ("corral", "sglang-router", "vllm-router")
WORKLOADS = ("conversation", "shared_prefix", "no_reuse", "hop")
CHARS_PER_TOKEN = 4  # the fake workers' (and the router's default) tokenizer: 4 bytes a token


@dataclass(frozen=True)
class Req:
    prompt: str
    max_tokens: int


# ---- workloads -------------------------------------------------------------------------------------------
def _block_text(key: str, tokens: int) -> str:
    """``tokens`` tokens of text unique to ``key`` (ASCII, so 4 characters a token exactly)."""
    n = tokens * CHARS_PER_TOKEN
    unit = f"[{key}]"
    return (unit * (n // len(unit) + 1))[:n]


def conversation(n: int, block_tokens: int, max_tokens: int) -> list[Req]:
    """The first ``n`` records of the shipped Mooncake conversation sample, as text, in trace order."""
    out: list[Req] = []
    with open(DATA / "conversation_trace_head.jsonl") as f:
        for line in f:
            if len(out) >= n:
                break
            rec = json.loads(line)
            text = "".join(_block_text(f"m{h}", block_tokens) for h in rec["hash_ids"])
            out.append(Req(text, max(1, min(max_tokens, int(rec["output_length"])))))
    return out


def shared_prefix(
    n: int, groups: int, prefix_tokens: int, suffix_tokens: int, max_tokens: int, seed: int = 7
) -> list[Req]:
    rng = random.Random(seed)
    prefixes = [_block_text(f"sys{g}", prefix_tokens) for g in range(groups)]
    return [
        Req(prefixes[rng.randrange(groups)] + _block_text(f"q{i}", suffix_tokens), max_tokens)
        for i in range(n)
    ]


def no_reuse(n: int, tokens: int, max_tokens: int) -> list[Req]:
    return [Req(_block_text(f"u{i}", tokens), max_tokens) for i in range(n)]


def hop(n: int) -> list[Req]:
    return [Req(f"ping {i}", 1) for i in range(n)]


def build_workloads(ns: argparse.Namespace) -> dict[str, list[Req]]:
    n = ns.requests
    return {
        "conversation": conversation(ns.conversation_requests, ns.block_tokens, ns.max_tokens),
        "shared_prefix": shared_prefix(n, ns.groups, ns.prefix_tokens, ns.suffix_tokens, ns.max_tokens),
        "no_reuse": no_reuse(n, ns.prefix_tokens // 4, ns.max_tokens),
        "hop": hop(ns.hop_requests),
    }


# ---- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_command(name: str, peer_bin: str | None) -> list[str] | None:
    """How to start peer ``name`` here, or None when it is not installed."""
    path = os.pathsep.join([p for p in (peer_bin, os.environ.get("PATH", "")) if p])
    if name == "sglang-router":
        if importlib.util.find_spec("sglang_router") is not None:
            return [sys.executable, "-m", "sglang_router.launch_router"]
        exe = shutil.which("sglang-router", path=path)
        return [exe, "launch"] if exe else None
    if name == "vllm-router":
        if importlib.util.find_spec("vllm_router") is not None:
            return [sys.executable, "-m", "vllm_router.launch_router"]
        exe = shutil.which("vllm-router", path=path)
        return [exe] if exe else None
    raise ValueError(name)


def peer_version(name: str, cmd: list[str]) -> str:
    """The installed peer's version (from the Python that runs it), or \"\" when unknown."""
    py = cmd[0] if cmd[1:2] == ["-m"] else str(Path(cmd[0]).with_name("python"))
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def router_command(name: str, urls: list[str], port: int, peer_bin: str | None) -> list[str] | None:
    if name == "corral":
        return [
            sys.executable,
            "-m",
            "corral.api.cli",
            "router",
            *[a for u in urls for a in ("--backend", u)],
            "--host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--grpc-port",
            "0",
            "--log-level",
            "WARNING",
        ]
    base = peer_command(name, peer_bin)
    if base is None:
        return None
    level = "warn" if name == "sglang-router" else "warning"  # their CLIs spell it differently
    return [
        *base,
        "--worker-urls",
        *urls,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        level,
    ]


class Proc:
    """A child process with its output in a log file (shown when it fails)."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._f = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-n:].decode(errors="replace")
        return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def start_workers(n: int, config: dict[str, Any], log: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [sys.executable, "-m", "corral.serve.fakevllm", "--workers", str(n), "--config", json.dumps(config)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"), start_new_session=True)  # noqa: SIM115
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"fake workers did not start: {log.read_text()[-2000:]}")
    return p, list(json.loads(line)["urls"])


# ---- the client -----------------------------------------------------------------------------------------
def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def drive(
    http: Any, urls: list[str], reqs: list[Req], concurrency: int, warmup: int = 0, stream: bool = True
) -> dict[str, Any]:
    """Send ``reqs`` (in order) with ``concurrency`` closed-loop streams, round-robin over ``urls``. TTFT
    percentiles leave out the first ``warmup`` requests (the cold start every router pays alike: all streams
    at once on empty caches); throughput counts every request."""
    ttft: list[float] = []
    measured: list[float] = []
    errors: dict[str, int] = {}
    it = iter(enumerate(reqs))

    async def one(i: int, r: Req) -> None:
        body = {"model": MODEL, "prompt": r.prompt, "max_tokens": r.max_tokens, "stream": stream}
        t0 = time.perf_counter()
        first = None
        try:
            async with http.post(urls[i % len(urls)] + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                    await resp.read()
                    return
                if not stream:  # the whole response: "first token" = the response
                    await resp.read()
                    first = time.perf_counter() - t0
                async for line in resp.content:
                    if first is None and line.startswith(b"data:"):
                        first = time.perf_counter() - t0
                    if line.startswith(b"data: [DONE]"):
                        break
        except Exception as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            return
        if first is None:
            errors["no data"] = errors.get("no data", 0) + 1
        else:
            ttft.append(first)
            if i >= warmup:
                measured.append(first)

    async def client() -> None:
        for i, r in it:
            await one(i, r)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(reqs),
        "ok": len(ttft),
        "errors": errors,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ttft) / wall, 1) if wall > 0 else 0.0,
        "ttft_p50_ms": round(_pct(measured, 50) * 1e3, 2),
        "ttft_p99_ms": round(_pct(measured, 99) * 1e3, 2),
        "ttft_p99_with_warmup_ms": round(_pct(ttft, 99) * 1e3, 2),
        "warmup_requests": warmup,
    }


async def hop_probe(http: Any, urls: list[str], reqs: list[Req], concurrency: int) -> dict[str, Any]:
    """The hop probe: one client first (the unloaded hop, a tenth of the requests, at least 20; streamed,
    then the same as whole responses), then ``concurrency`` clients (throughput and the loaded hop)."""
    n = max(20, len(reqs) // 10)
    serial = await drive(http, urls, reqs[:n], 1)
    whole = await drive(http, urls, reqs[:n], 1, stream=False)  # no SSE: what streaming itself costs
    r = await drive(http, urls, reqs, concurrency)
    r["serial_ttft_p50_ms"], r["serial_ttft_p99_ms"] = serial["ttft_p50_ms"], serial["ttft_p99_ms"]
    r["serial_whole_p50_ms"] = whole["ttft_p50_ms"]
    r["serial_requests"] = serial["requests"] + whole["requests"]
    return r


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeated runs: every number is the median over the runs (errors are summed); the
    runs themselves are kept under ``runs`` when there are several."""
    out = dict(runs[-1])
    if len(runs) == 1:
        return out
    for k, v in out.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, n in r["errors"].items():
            errors[k] = errors.get(k, 0) + n
    out["errors"] = errors
    out["runs"] = runs
    return out


async def worker_stats(http: Any, workers: list[str]) -> list[dict[str, Any]]:
    out = []
    for w in workers:
        async with http.get(w + "/fake/stats") as r:
            out.append(await r.json())
    return out


async def reset_workers(http: Any, workers: list[str]) -> None:
    for w in workers:
        async with http.post(w + "/fake/reset") as r:
            await r.read()


def cache_and_balance(stats: list[dict[str, Any]]) -> dict[str, Any]:
    reqs = [s["requests"] for s in stats]
    prompt = sum(s["prompt_tokens"] for s in stats)
    cached = sum(s["cached_tokens"] for s in stats)
    mean = sum(reqs) / len(reqs) if reqs else 0
    return {
        "prefix_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "imbalance": round(max(reqs) / mean, 3) if mean else float("nan"),
        "requests_per_worker": reqs,
    }


async def wait_ready(http: Any, url: str, proc: Proc, timeout: float) -> None:
    """Until a completion through the router succeeds (every router here answers that once its workers are
    registered)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError(f"exited with {proc.p.returncode}: {proc.tail()}")
        try:
            body = {"model": MODEL, "prompt": "warm up", "max_tokens": 1}
            async with http.post(url + "/v1/completions", json=body) as r:
                last = f"HTTP {r.status}: {(await r.text())[:200]}"
                if r.status == 200:
                    return
        except Exception as e:
            last = repr(e)
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout:.0f}s (last: {last}); log: {proc.tail()}")


async def run_all(ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    import aiohttp

    loads = build_workloads(ns)
    logs = Path(tempfile.mkdtemp(prefix="corral-bench-peers-"))  # the processes' logs, not the results
    print(f"peers: process logs in {logs}", file=sys.stderr)
    wcfg = {
        "model": MODEL,
        "max_running": ns.max_running,
        "cache_blocks": ns.cache_blocks,
        "prefill_s_per_token": ns.prefill_us_per_token * 1e-6,
        "decode_s_per_token": ns.decode_ms * 1e-3,
        "prefill_base_s": 0.001,
    }
    wproc, workers = start_workers(ns.workers, wcfg, logs / "workers.log")
    results: dict[str, Any] = {}
    peers: dict[str, Any] = {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
            # direct: the hop probe straight to the workers (round robin), the baseline of the hop
            await reset_workers(http, workers)
            direct = [await hop_probe(http, workers, loads["hop"], ns.concurrency) for _ in range(ns.repeats)]
            results["direct"] = {"hop": median_of(direct)}
            for name in ns.peers:
                port = free_port()
                cmd = router_command(name, workers, port, ns.peer_bin)
                if cmd is None:
                    peers[name] = {"installed": False, "note": "not installed (pip install 'corral[peers]')"}
                    print(f"peers: {name} is not installed: skipped", file=sys.stderr)
                    continue
                shown = [Path(cmd[0]).name, *takewhile(lambda a: not a.startswith("--"), cmd[1:])]
                peers[name] = {"installed": True, "command": shown, "version": peer_version(name, cmd)}
                proc = Proc(cmd, logs / f"{name}.log")
                try:
                    url = f"http://127.0.0.1:{port}"
                    try:
                        await wait_ready(http, url, proc, ns.start_timeout)
                    except RuntimeError as e:
                        peers[name]["error"] = str(e)[-2000:]
                        print(f"peers: {name} did not start: {e}", file=sys.stderr)
                        continue
                    results[name] = {}
                    for wl in ns.workloads:
                        runs = []
                        for _ in range(ns.repeats):
                            await reset_workers(http, workers)
                            warm = 0 if wl == "hop" else min(ns.warmup, len(loads[wl]) // 2)
                            if wl == "hop":
                                one = await hop_probe(http, [url], loads[wl], ns.concurrency)
                            else:
                                one = await drive(http, [url], loads[wl], ns.concurrency, warm)
                            one.update(cache_and_balance(await worker_stats(http, workers)))
                            runs.append(one)
                        r = results[name][wl] = median_of(runs)
                        print(
                            f"peers: {name:14s} {wl:14s} {r['throughput_rps']:8.1f} req/s  TTFT p50 "
                            f"{r['ttft_p50_ms']:8.2f} ms p99 {r['ttft_p99_ms']:8.2f} ms  hit "
                            f"{r['prefix_hit_rate']:.3f}  imbalance {r['imbalance']:.2f}  "
                            f"errors {r['errors']}",
                            file=sys.stderr,
                            flush=True,
                        )
                finally:
                    proc.stop()
    finally:
        wproc.terminate()
        wproc.wait(10)
    d = results["direct"]["hop"]
    for name, per in results.items():
        if name != "direct" and "hop" in per:
            h = per["hop"]
            h["hop_overhead_ms"] = round(h["serial_ttft_p50_ms"] - d["serial_ttft_p50_ms"], 2)
            h["hop_overhead_loaded_ms"] = round(h["ttft_p50_ms"] - d["ttft_p50_ms"], 2)
            h["hop_overhead_whole_ms"] = round(h["serial_whole_p50_ms"] - d["serial_whole_p50_ms"], 2)
    return {"peers": peers, "results": results}


# ---- report ---------------------------------------------------------------------------------------------
def write_report(data: dict[str, Any], out: Path) -> None:
    (out / "peers.json").write_text(json.dumps(data, indent=2) + "\n")
    meta, res, peers = data["meta"], data["results"], data["peers"]
    routers = [n for n in res if n != "direct"]
    lines = [
        "# Corral vs sglang-router vs vllm-router, in front of the same fake vLLM workers",
        "",
        f"{describe(meta)}; `{' '.join(meta['argv'])}`; {meta['machine']}; {meta['params']['workers']} "
        f"workers, {meta['params']['concurrency']} concurrent streams. Generated by `corral bench peers` "
        "(bench/corral/bench/peers.py).",
        "",
        _setup_line(meta),
        "",
    ]
    for name, p in peers.items():
        if p.get("installed") and not p.get("error"):
            lines.append(
                f"- {name} {p.get('version') or '(version unknown)'}: `{' '.join(p['command'])} ...`"
            )
    for name, p in peers.items():
        if not p.get("installed"):
            lines.append(f"- **{name}: not installed** (`pip install 'corral[peers]'`), no numbers.")
        elif p.get("error"):
            last = [ln for ln in p["error"].splitlines() if ln.strip()][-1:] or ["?"]
            lines.append(f"- **{name}: failed to start**: `{last[0].strip()[:300]}` (see peers.json)")
    lines += [
        "",
        "| workload | router | req/s | TTFT p50 ms | TTFT p99 ms | prefix hit rate | imbalance | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for wl in data["meta"]["params"]["workloads"]:
        rows = [("direct", res["direct"]["hop"])] if wl == "hop" else []
        rows += [(n, res[n][wl]) for n in routers if wl in res[n]]
        for n, r in rows:
            hit = f"{r['prefix_hit_rate']:.3f}" if "prefix_hit_rate" in r else "-"
            imb = f"{r['imbalance']:.2f}" if "imbalance" in r else "-"
            err = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            lines.append(
                f"| {wl} | {n} | {r['throughput_rps']:.1f} | {r['ttft_p50_ms']:.2f} | "
                f"{r['ttft_p99_ms']:.2f} | {hit} | {imb} | {err} |"
            )
    hops = [(n, res[n]["hop"]) for n in routers if "hop" in res[n]]
    if hops:
        lines += [
            "",
            "Hop overhead (TTFT p50 through the router minus straight to the workers, tiny prompts, one "
            "output token), streamed with 1 client / streamed with "
            f"{meta['params']['concurrency']} / whole responses with 1 client: "
            + ", ".join(
                f"{n} {h['hop_overhead_ms']:+.2f} / {h['hop_overhead_loaded_ms']:+.2f} / "
                f"{h.get('hop_overhead_whole_ms', float('nan')):+.2f} ms"
                for n, h in hops
            )
            + ".",
        ]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    _plot(data, out / "peers.png")


def _setup_line(meta: dict[str, Any]) -> str:
    p = meta["params"]
    la = meta.get("load_avg") or []
    load = (
        f" Load average (1/5/15 min) at start {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}, at end "
        f"{la[3]:.1f}/{la[4]:.1f}/{la[5]:.1f} on {os.cpu_count()} CPUs (above that, other jobs shared the "
        "cores: compare routers within one run only)."
        if len(la) == 6
        else ""
    )
    return (
        f"Workers: prefill {p['prefill_us_per_token']:g} us per uncached token, one prefill at a time, "
        f"{p['max_running']} requests admitted, {p['decode_ms']:g} ms per output token (at most "
        f"{p['max_tokens']}), an LRU prefix cache of {p['cache_blocks']} 16-token blocks. Workloads: "
        f"{p['conversation_requests']} Mooncake records ({p['block_tokens']} tokens per hash id), "
        f"{p['requests']} shared-prefix requests over {p['groups']} prompts of {p['prefix_tokens']} tokens, "
        f"{p['requests']} no-reuse prompts, {p['hop_requests']} hop probes. TTFT percentiles leave out the "
        f"first {p['warmup']} requests of a workload (the cold start)."
        + (f" Every number is the median of {p['repeats']} runs." if p.get("repeats", 1) > 1 else "")
        + load
    )


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = data["results"]
    routers = [n for n in res if n != "direct"]
    wls = [w for w in data["meta"]["params"]["workloads"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(
        axes,
        ("throughput_rps", "ttft_p99_ms", "prefix_hit_rate"),
        ("throughput (req/s)", "TTFT p99 (ms)", "prefix hit rate"),
        strict=True,
    ):
        width = 0.8 / max(1, len(routers))
        for i, n in enumerate(routers):
            xs = [j + i * width for j in range(len(wls))]
            ys = [res[n].get(w, {}).get(key, 0) or 0 for w in wls]
            ax.bar(xs, ys, width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wls))], wls, rotation=15)
        ax.set_title(title)
    if routers:
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="corral bench peers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a short run (a few dozen requests per workload)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"routers to run (default {','.join(PEERS)})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}")
    ap.add_argument("--peer-bin", default=None, help="a folder holding the peers' commands (a venv's bin)")
    ap.add_argument("--workers", type=int, default=4, help="fake vLLM workers (default 4)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent client streams (default 16)")
    ap.add_argument(
        "--requests", type=int, default=None, help="requests per workload (default 400; quick 40)"
    )
    ap.add_argument(
        "--hop-requests", type=int, default=None, help="hop probe requests (default 4000; quick 200)"
    )
    ap.add_argument(
        "--block-tokens",
        type=int,
        default=64,
        help="tokens per Mooncake 512-token block (default 64: the trace scaled by 1/8)",
    )
    ap.add_argument("--max-tokens", type=int, default=8, help="output tokens cap (default 8)")
    ap.add_argument("--groups", type=int, default=32, help="shared_prefix: system prompts (default 32)")
    ap.add_argument(
        "--prefix-tokens",
        type=int,
        default=4096,
        help="shared_prefix: tokens of each system prompt (default 4096; no_reuse prompts: a quarter)",
    )
    ap.add_argument("--suffix-tokens", type=int, default=64, help="shared_prefix: unique tokens (default 64)")
    ap.add_argument("--max-running", type=int, default=8, help="worker concurrency limit (default 8)")
    ap.add_argument(
        "--cache-blocks",
        type=int,
        default=3200,
        help="worker prefix cache in 16-token blocks (default 3200: an H100's ~400k tokens of KV "
        "scaled by the trace's 1/8)",
    )
    ap.add_argument(
        "--prefill-us-per-token",
        type=float,
        default=17.3,
        help="worker prefill cost (default 17.3 us/token: the H100 profile's, Llama-3.1-8B)",
    )
    ap.add_argument("--decode-ms", type=float, default=2.0, help="worker decode cost (ms/token)")
    ap.add_argument(
        "--conversation-requests",
        type=int,
        default=None,
        help="Mooncake records replayed (default 1500: the whole shipped sample; quick 100)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every (router, workload); each number is the median (default 1)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests left out of the TTFT percentiles (default 2 x --concurrency)",
    )
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.requests = ns.requests or (40 if ns.quick else 400)
    ns.hop_requests = ns.hop_requests or (200 if ns.quick else 4000)
    ns.warmup = 2 * ns.concurrency if ns.warmup is None else ns.warmup
    ns.conversation_requests = ns.conversation_requests or (100 if ns.quick else 1500)
    ns.peers = [p.strip() for p in ns.peers.split(",") if p.strip()]
    ns.workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    bad = [p for p in ns.peers if p not in PEERS] + [w for w in ns.workloads if w not in WORKLOADS]
    if bad:
        print(
            f"corral bench peers: unknown {', '.join(bad)} (routers: {', '.join(PEERS)}; workloads: "
            f"{', '.join(WORKLOADS)})",
            file=sys.stderr,
        )
        return 2
    ns.out.mkdir(parents=True, exist_ok=True)
    load0 = list(os.getloadavg())
    data = asyncio.run(run_all(ns, ns.out))
    params = {k: v for k, v in vars(ns).items() if k not in ("out", "peer_bin")}
    data = {"meta": {**provenance(), "params": params, "load_avg": load0 + list(os.getloadavg())}, **data}
    write_report(data, ns.out)
    print(f"corral bench peers: wrote {ns.out / 'peers.json'}, peers.md, peers.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
