"""Recovery benchmark: how long the data plane takes to notice and recover from a fault, measured from
outside through the public APIs, every part its own process on 127.0.0.1 (:mod:`corral.bench.procs`).

Per repetition, with sim engine processes behind a standalone router process (``--stale-after`` as
shipped: the router's default 1.0 s unless ``--stale-after`` is given):

- ``engine_kill_removed_s``: SIGKILL of an engine -> the router's ``/ready`` no longer counts it;
- ``engine_stall_ejected_s``: SIGSTOP of an engine (alive, silent) -> ejected;
- ``engine_stall_readmitted_s``: SIGCONT -> routable again;
- ``router_restart_serving_s``: a killed router's replacement spawned -> listening;
- ``router_restart_rebuilt_s``: spawned -> its prefix index (``Explain`` dry run: the holder replica with the
  prompt's cached blocks) and adapter residency (``/v1/models``) rebuilt from the engines' event streams,
  with ``--prefixes`` distinct ~2k-token prefixes cached across the engines.

Writes ``DIR/recovery.{json,md}`` (default DIR ./corral-bench/) with median and max per figure.

    python -m corral.bench.recovery [--quick] [--repeats N] [--out DIR]     (or: corral bench recovery)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from corral.bench.procs import EngineProc, RouterProc, start_engine, start_router
from corral.bench.provenance import describe, provenance
from corral.v1 import engine_pb2 as epb
from corral.v1 import engine_pb2_grpc as epb_grpc
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc

MODEL = "llama-8b"
PREFIX = "You are a helpful assistant for the Corral project. " * 160  # ~2k sim tokens, ~130 blocks
ADAPTER = "sql-lora"

FIGURES = {
    "engine_kill_removed_s": "engine SIGKILL -> out of the router's fleet",
    "engine_stall_ejected_s": "engine SIGSTOP (alive, silent) -> ejected",
    "engine_stall_readmitted_s": "engine SIGCONT -> routable again",
    "router_restart_serving_s": "router respawned -> listening",
    "router_restart_rebuilt_s": "router respawned -> prefix index + adapters rebuilt",
}


def _until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception:  # not there yet (connection refused while starting, ...)
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _replicas(r: RouterProc) -> int:
    try:
        with urllib.request.urlopen(r.http_url + "/ready", timeout=2) as resp:
            return int(json.load(resp)["replicas"])
    except urllib.error.HTTPError as e:  # 503 while none
        return int(json.load(e)["replicas"])


def _models(r: RouterProc) -> list[str]:
    with urllib.request.urlopen(r.http_url + "/v1/models", timeout=2) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def _explain(r: RouterProc, prompt: str) -> tuple[str, int]:
    with grpc.insecure_channel(r.grpc_address) as ch:
        req = rpb.ExplainRequest(request=rpb.CompletionRequest(model=MODEL, prompt=prompt))
        ex = rpb_grpc.RouterStub(ch).Explain(req, timeout=5)
        return ex.replica_id, ex.cached_blocks


def _engines(n: int, log_dir: Path) -> list[EngineProc]:
    profiles = ["H100", "A100-80GB"]
    return [start_engine(f"e{i}", MODEL, profile=profiles[i % 2], log_dir=log_dir) for i in range(n)]


def engine_faults(stale_after_s: float, log_dir: Path) -> dict[str, float]:
    """One repetition of the engine kill and stall figures (3 engines, 1 router)."""
    engines = _engines(3, log_dir)
    router = start_router([e.address for e in engines], stale_after_s=stale_after_s, log_dir=log_dir)
    try:
        _until(lambda: _replicas(router) == 3, 30, "3 replicas")
        t0 = time.monotonic()
        engines[2].proc.kill()
        _until(lambda: _replicas(router) == 2, 30, "the killed engine removed")
        out = {"engine_kill_removed_s": time.monotonic() - t0}
        t0 = time.monotonic()
        engines[1].proc.stall()
        _until(lambda: _replicas(router) == 1, 30, "the stalled engine ejected")
        out["engine_stall_ejected_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        engines[1].proc.cont()
        _until(lambda: _replicas(router) == 2, 30, "the resumed engine re-admitted")
        out["engine_stall_readmitted_s"] = time.monotonic() - t0
        return out
    finally:
        for p in [router.proc, *(e.proc for e in engines)]:
            p.terminate(5)


def router_restart(stale_after_s: float, prefixes: int, log_dir: Path) -> dict[str, float]:
    """One repetition of the router restart figures: state in the engines, a router killed and respawned."""
    engines = _engines(3, log_dir)
    addrs = [e.address for e in engines]
    router = start_router(addrs, stale_after_s=stale_after_s, policy="corral", log_dir=log_dir)
    procs = [router.proc, *(e.proc for e in engines)]
    try:
        _until(lambda: _replicas(router) == 3, 30, "3 replicas")
        with grpc.insecure_channel(router.grpc_address) as ch:
            st = rpb_grpc.RouterStub(ch)
            reqs = [rpb.CompletionRequest(model=MODEL, prompt=f"{i:04d} " + PREFIX + "Q?", max_tokens=1)
                    for i in range(prefixes)]  # fmt: skip
            holders = [st.Generate(q, timeout=60).replica_id for q in reqs]
        with grpc.insecure_channel(addrs[0]) as ch:
            epb_grpc.EngineStub(ch).LoadAdapter(
                epb.LoadAdapterRequest(name=ADAPTER, source_uri="s3://bench/sql-lora", tier="gpu"), timeout=30
            )
        probe = f"{prefixes - 1:04d} " + PREFIX + "Another question?"

        def rebuilt(r: RouterProc) -> bool:
            rid, blocks = _explain(r, probe)
            return rid == holders[-1] and blocks >= 100 and ADAPTER in _models(r)

        _until(lambda: rebuilt(router), 30, "the first router's state")
        router.proc.kill()
        t0 = time.monotonic()
        again = start_router(addrs, name="router-restarted", stale_after_s=stale_after_s, policy="corral",
                             log_dir=log_dir)  # fmt: skip
        procs.append(again.proc)
        serving = time.monotonic() - t0
        _until(lambda: rebuilt(again), 60, "the restarted router's state")
        return {"router_restart_serving_s": serving, "router_restart_rebuilt_s": time.monotonic() - t0}
    finally:
        for p in procs:
            p.terminate(5)


def run(repeats: int, stale_after_s: float, prefixes: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {k: [] for k in FIGURES}
    with tempfile.TemporaryDirectory(prefix="corral-recovery-") as tmp:
        for i in range(repeats):
            got = engine_faults(stale_after_s, Path(tmp))
            got.update(router_restart(stale_after_s, prefixes, Path(tmp)))
            for k, v in got.items():
                samples[k].append(v)
            print(
                f"repeat {i + 1}/{repeats}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in samples.items()),
                flush=True,
            )
    figures = {
        k: {"what": FIGURES[k], "median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3),
            "samples_s": [round(x, 3) for x in v]}
        for k, v in samples.items()
    }  # fmt: skip
    return {
        "meta": provenance(),
        "config": {"repeats": repeats, "stale_after_s": stale_after_s, "prefixes": prefixes, "engines": 3},
        "figures": figures,
    }


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        "# Recovery times",
        "",
        f"{describe(res['meta'])}; `{' '.join(res['meta']['argv'])}` on {res['meta']['machine']}; "
        f"{cfg['engines']} sim engine processes and standalone router processes on 127.0.0.1, "
        f"`--stale-after {cfg['stale_after_s']}`, {cfg['prefixes']} cached ~2k-token prefixes, "
        f"{cfg['repeats']} repetitions. Measured from outside: the router's `/ready` replica count, "
        "`Explain` dry runs and `/v1/models`, polled every 5 ms.",
        "",
        "| figure | what | median (s) | max (s) |",
        "|---|---|---:|---:|",
    ]
    for k, f in res["figures"].items():
        lines.append(f"| `{k}` | {f['what']} | {f['median_s']:.3f} | {f['max_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench recovery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1 repetition, 4 prefixes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefixes", type=int, default=24, help="distinct cached prefixes the restart rebuilds")
    ap.add_argument(
        "--stale-after", type=float, default=1.0, help="the router's staleness bound (its default)"
    )
    ap.add_argument("--out", default="corral-bench")
    ns = ap.parse_args(argv)
    repeats, prefixes = (1, 4) if ns.quick else (ns.repeats, ns.prefixes)
    res = run(repeats, ns.stale_after, prefixes)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "recovery.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
