"""Security benchmark: what tenant keys and TLS cost, and how fast a key change takes effect.

Measured on 127.0.0.1 with the shipped defaults (``KeyStore`` polls its file every 1.0 s):

- ``lookup_us``: one API key check (hash + digest lookup + constant-time compare) with ``--keys`` keys
  loaded, for a known and an unknown key (median over many calls);
- ``parse_ms``: parsing a key file of ``--keys`` entries (what a reload costs);
- ``key_added_s`` / ``key_revoked_s``: a key file replaced atomically (as a Secret update does) -> the first
  request with the new key succeeds / the revoked key gets 401, through a running router;
- request latency (P50 / P99, ms) of small completions through a router in front of zero-cost echo engines:
  HTTP vs HTTPS, gRPC vs gRPC with mutual TLS (router <-> engine link in mutual TLS for the TLS rows), with
  tenant keys on; so the figures are the transport's and the auth's, not an engine's.

Writes ``DIR/security.{json,md}`` (default DIR ./corral-bench/).

    python -m corral.bench.security [--quick] [--out DIR]     (or: corral bench security)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from corral.bench.provenance import describe, provenance
from corral.router.server import RouterConfig, RouterServer, load_api_keys
from corral.router.server.auth import KeyTable, hash_key, parse_key_file
from corral.router.tls import ClientTls, ServerTls
from corral.serve.endpoint import EchoEngine, EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc

MODEL = "echo"


def _key_file(n: int, extra: str = "") -> str:
    lines = ["keys:"]
    lines += [f'  - {{tenant: t{i % 50}, key: "{hash_key(f"sk-bench-{i}")}"}}' for i in range(n)]
    return "\n".join(lines) + "\n" + extra


def lookups(n_keys: int, calls: int) -> dict[str, float]:
    text = _key_file(n_keys)
    t0 = time.perf_counter()
    table: KeyTable = parse_key_file(text)
    parse_ms = (time.perf_counter() - t0) * 1e3
    out = {"parse_ms": round(parse_ms, 2)}
    for name, key in (("lookup_known_us", f"sk-bench-{n_keys // 2}"), ("lookup_unknown_us", "sk-nobody")):
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            table.lookup(key)
            samples.append(time.perf_counter() - t)
        out[name] = round(statistics.median(samples) * 1e6, 2)
    return out


async def _until(cond: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while not await cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)
    return time.perf_counter() - t0


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


async def reloads(tmp: Path, repeats: int) -> dict[str, list[float]]:
    keys = tmp / "keys.yaml"
    keys.write_text(_key_file(10))
    ep = await EngineEndpoint.start(EchoEngine(model=MODEL), "127.0.0.1", 0)
    r = RouterServer([ep.address], RouterConfig(api_keys=load_api_keys(keys)))  # shipped poll period
    await r.start("127.0.0.1", 0, 0)
    await r.wait_for_replicas(1, timeout=10)
    out: dict[str, list[float]] = {"key_added_s": [], "key_revoked_s": []}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as s:

            async def status(key: str) -> int:
                headers = {"Authorization": f"Bearer {key}"}
                async with s.post(r.http_url + "/v1/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            for i in range(repeats):
                new = f"sk-new-{i}"
                _replace(keys, _key_file(10, f'  - {{tenant: tn, key: "{hash_key(new)}"}}\n'))

                async def added(new: str = new) -> bool:
                    return await status(new) == 200

                out["key_added_s"].append(await _until(added))
                _replace(keys, _key_file(10))

                async def revoked(new: str = new) -> bool:
                    return await status(new) == 401

                out["key_revoked_s"].append(await _until(revoked))
    finally:
        await r.stop(0)
        await ep.stop(None)
    return out


async def latencies(tmp: Path, n: int) -> dict[str, dict[str, float]]:
    """The four fronts measured interleaved (one request to each in turn), so load from other processes on
    the machine falls on all of them alike."""
    from corral.bench.certs import make_certs  # needs `cryptography` (the dev or operator extra)

    certs = make_certs(tmp / "certs")
    keys = tmp / "lat-keys.yaml"
    keys.write_text(f'keys:\n  - {{tenant: a, key: "{hash_key("sk-lat")}"}}\n')
    server_tls = ServerTls(certs.server_cert, certs.server_key, client_ca_file=certs.ca)
    link = ClientTls(certs.ca, certs.client_cert, certs.client_key)
    stacks: list[tuple[EngineEndpoint, RouterServer]] = []
    try:
        for tls in (False, True):
            front = server_tls if tls else None
            ep = await EngineEndpoint.start(EchoEngine(model=MODEL), "127.0.0.1", 0, tls=front)
            r = RouterServer(
                [ep.address], RouterConfig(api_keys=load_api_keys(keys)), engine_tls=link if tls else None
            )
            stacks.append((ep, r))
            await r.start("127.0.0.1", 0, 0, tls=front)
            await r.wait_for_replicas(1, timeout=10)
        (_, plain), (_, secure) = stacks
        headers = {"Authorization": "Bearer sk-lat"}
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 1}
        req = rpb.CompletionRequest(model=MODEL, prompt="hello there", max_tokens=1)
        md = (("authorization", "Bearer sk-lat"),)
        channels = [
            grpc.aio.insecure_channel(plain.grpc_address),
            grpc.aio.secure_channel(secure.grpc_address, link.grpc_credentials()),
        ]
        stubs = [rpb_grpc.RouterStub(ch) for ch in channels]
        samples: dict[str, list[float]] = {"http": [], "https": [], "grpc": [], "grpc_mtls": []}
        async with aiohttp.ClientSession() as s:

            async def http(url: str, ctx: Any) -> None:
                async with s.post(url + "/v1/completions", json=body, headers=headers, ssl=ctx) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()

            ctx = link.ssl_context()
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "http": lambda: http(plain.http_url, True),
                "https": lambda: http(secure.http_url, ctx),
                "grpc": lambda: stubs[0].Generate(req, metadata=md),
                "grpc_mtls": lambda: stubs[1].Generate(req, metadata=md),
            }
            for i in range(n + 20):
                for name, call in calls.items():
                    t = time.perf_counter()
                    await call()
                    if i >= 20:  # warm-up excluded
                        samples[name].append(time.perf_counter() - t)
        for ch in channels:
            await ch.close()
        return {k: _pcts(v) for k, v in samples.items()}
    finally:
        for ep, r in stacks:
            await r.stop(0)
            await ep.stop(None)


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": round(s[len(s) // 2] * 1e3, 3),
        "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3, 3),
        "n": len(s),
    }


def run(n_keys: int, calls: int, repeats: int, requests: int) -> dict[str, Any]:
    res: dict[str, Any] = {
        "meta": provenance(),
        "config": {
            "keys": n_keys,
            "lookup_calls": calls,
            "reload_repeats": repeats,
            "requests": requests,
            "poll_s": 1.0,
        },
        "auth": lookups(n_keys, calls),
    }
    with tempfile.TemporaryDirectory(prefix="corral-security-") as tmp:
        rel = asyncio.run(reloads(Path(tmp), repeats))
        res["reload"] = {
            k: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)} for k, v in rel.items()
        }
        try:
            res["latency"] = asyncio.run(latencies(Path(tmp), requests))
        except ImportError as e:  # no `cryptography`: the TLS rows are left out, said so
            res["latency"] = {}
            res["latency_skipped"] = str(e)
    return res


def markdown(res: dict[str, Any]) -> str:
    cfg, a, rel = res["config"], res["auth"], res["reload"]
    lines = [
        "# Security costs",
        "",
        f"{describe(res['meta'])}; `{' '.join(res['meta']['argv'])}` on {res['meta']['machine']}; 127.0.0.1.",
        "",
        f"API key check with {cfg['keys']} keys loaded (median of {cfg['lookup_calls']} calls): known key "
        f"**{a['lookup_known_us']} µs**, unknown key **{a['lookup_unknown_us']} µs**; parsing the "
        f"{cfg['keys']}-key file: **{a['parse_ms']} ms**.",
        "",
        f"Key file replaced atomically (as a Secret update does) -> in force through a running router "
        f"(file polled every {cfg['poll_s']} s, the shipped default; {cfg['reload_repeats']} repetitions):",
        "",
        "| figure | median (s) | max (s) |",
        "|---|---:|---:|",
    ]
    for k, v in rel.items():
        lines.append(f"| `{k}` | {v['median_s']:.3f} | {v['max_s']:.3f} |")
    if res.get("latency"):
        lines += [
            "",
            f"Request latency, {cfg['requests']} sequential 1-token completions with a tenant key, router "
            "in front of a zero-cost echo engine (TLS rows: client <-> router TLS, router <-> engine mutual "
            "TLS; connections reused; the four fronts measured interleaved, one request each in turn):",
            "",
            "| front | P50 (ms) | P99 (ms) |",
            "|---|---:|---:|",
        ]
        for k, v in res["latency"].items():
            lines.append(f"| {k} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |")
    elif res.get("latency_skipped"):
        lines += ["", f"TLS latency not measured: {res['latency_skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral bench security", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1,000 keys, 2 reloads, 100 requests")
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5, help="key reloads measured")
    ap.add_argument("--requests", type=int, default=500, help="requests per front")
    ap.add_argument("--out", default="corral-bench")
    ns = ap.parse_args(argv)
    n_keys, repeats, requests = (1000, 2, 100) if ns.quick else (ns.keys, ns.repeats, ns.requests)
    res = run(n_keys, 20_000, repeats, requests)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "security.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "security.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
