"""TLS end to end on 127.0.0.1 with throwaway certificates: sim engines serving gRPC over mutual TLS,
a router dialling them with a client certificate, and the router's HTTPS and gRPC (mTLS) fronts. Plaintext
or untrusted clients are refused; a missing certificate file is one clear error naming it."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from corral.router.server import RouterConfig, RouterServer
from corral.router.tls import ClientTls, ServerTls, TlsConfigError
from corral.serve.endpoint import EngineEndpoint
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_testkit import Certs, make_certs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

sim = pytest.importorskip("corral.serve.endpoint.sim")
MODEL = "llama-8b"


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
async def tls_fleet(certs: Certs) -> AsyncIterator[tuple[RouterServer, list[EngineEndpoint]]]:
    server_tls = ServerTls(certs.server_cert, certs.server_key, client_ca_file=certs.ca)  # mTLS
    eps = []
    for i in range(2):
        eng = sim.SimEndpointEngine.create("H100", f"h100-{i}", MODEL, time_scale=20.0, max_model_len=8192)
        eps.append(await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05, tls=server_tls))
    engine_tls = ClientTls(certs.ca, certs.client_cert, certs.client_key)
    r = RouterServer([e.address for e in eps], RouterConfig(stale_after_s=1.0), engine_tls=engine_tls)
    await r.start("127.0.0.1", 0, 0, tls=server_tls)
    try:
        await r.wait_for_replicas(2, timeout=20)  # the router reached both engines over mTLS
        yield r, eps
    finally:
        await r.stop(0)
        for e in eps:
            await e.stop(None)
            close = getattr(e.engine, "close", None)
            if close is not None:
                await close()


def _client_ssl(certs: Certs, with_cert: bool = True) -> ssl.SSLContext:
    t = ClientTls(certs.ca, certs.client_cert, certs.client_key) if with_cert else ClientTls(certs.ca)
    return t.ssl_context()


async def _post(url: str, body: Any, ssl_ctx: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, ssl=ssl_ctx) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_https_and_grpc_mtls_end_to_end(
    tls_fleet: tuple[RouterServer, list[EngineEndpoint]], certs: Certs
) -> None:
    r, _eps = tls_fleet
    assert r.http_url.startswith("https://")
    status, out = await _post(
        r.http_url + "/v1/completions",
        {"model": MODEL, "prompt": "hello", "max_tokens": 3},
        _client_ssl(certs),
    )
    assert status == 200 and out["choices"][0]["finish_reason"] == "length", out
    creds = ClientTls(certs.ca, certs.client_cert, certs.client_key).grpc_credentials()
    async with grpc.aio.secure_channel(r.grpc_address, creds) as ch:
        resp = await rpb_grpc.RouterStub(ch).Generate(
            rpb.CompletionRequest(model=MODEL, prompt="hi", max_tokens=2)
        )
    assert resp.finish_reason == "length" and resp.replica_id.startswith("h100-")


async def test_plaintext_and_untrusted_clients_are_refused(
    tls_fleet: tuple[RouterServer, list[EngineEndpoint]], certs: Certs
) -> None:
    r, eps = tls_fleet
    req = rpb.CompletionRequest(model=MODEL, prompt="hi", max_tokens=2)
    # gRPC: plaintext, no client certificate, a server the client does not trust
    attempts = {
        "plaintext": grpc.aio.insecure_channel(r.grpc_address),
        "no client cert": grpc.aio.secure_channel(r.grpc_address, ClientTls(certs.ca).grpc_credentials()),
        "untrusted server": grpc.aio.secure_channel(
            r.grpc_address,
            ClientTls(certs.other_ca, certs.client_cert, certs.client_key).grpc_credentials(),
        ),
    }
    for what, ch in attempts.items():
        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await rpb_grpc.RouterStub(ch).Generate(req, timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, what
    # HTTPS: plaintext HTTP to the TLS port, and a client without a certificate (mTLS)
    with pytest.raises(aiohttp.ClientError):
        await _post(r.http_url.replace("https://", "http://") + "/v1/completions", {"model": MODEL}, None)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await _post(
            r.http_url + "/v1/completions", {"model": MODEL, "prompt": "x"}, _client_ssl(certs, False)
        )
    # the engines speak only mutual TLS too: a plaintext health check never gets an answer
    async with grpc.aio.insecure_channel(eps[0].address) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)


async def test_router_without_engine_tls_never_admits_tls_engines(certs: Certs) -> None:
    """A router that dials TLS engines in plaintext gets no replica (and says so in /ready)."""
    eng = sim.SimEndpointEngine.create("H100", "h100-x", MODEL, time_scale=20.0)
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, tls=ServerTls(certs.server_cert, certs.server_key))
    r = RouterServer([ep.address], RouterConfig(stale_after_s=0.5))
    await r.start("127.0.0.1", 0, 0)
    try:
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await r.wait_for_replicas(1, timeout=2)
        async with aiohttp.ClientSession() as s, s.get(r.http_url + "/ready") as resp:
            assert resp.status == 503
    finally:
        await r.stop(0)
        await ep.stop(None)


def test_missing_or_bad_certificate_files_are_named(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(TlsConfigError, match=r"TLS certificate .*nope\.crt: No such file"):
        ServerTls(str(tmp_path / "nope.crt"), certs.server_key).ssl_context()
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(TlsConfigError, match=r"TLS key .*junk\.key: not a PEM file"):
        ServerTls(certs.server_cert, str(junk)).grpc_credentials()
    with pytest.raises(TlsConfigError, match="do they match"):
        ServerTls(certs.client_cert, certs.server_key).ssl_context()  # a key of another certificate
    with pytest.raises(TlsConfigError, match="needs both"):
        ClientTls(certs.ca, cert_file=certs.client_cert)
    folder = Path(certs.ca).parent
    assert ServerTls.from_dir(folder, mtls=True).client_ca_file == certs.ca


async def test_serve_router_deployment_uses_the_tls_folders(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ServeOptions' router_tls_dir / router_client_auth / engine_tls_dir reach a RouterDeployment replica:
    it dials a mutual-TLS engine by IP (checking the name corral-engine) and serves HTTPS with client
    certificates (Ray itself is not needed for this: its registry is replaced by the engine's address)."""
    from corral.router.engine_client import StaticDiscovery
    from corral.serve import deployments
    from corral.serve.app import ServeOptions, plan_pool
    from corral.serve.deployments import RouterDeployment

    folder = str(Path(certs.ca).parent)
    eng = sim.SimEndpointEngine.create("H100", "h100-s", "tiny", time_scale=20.0, max_model_len=4096)
    ep = await EngineEndpoint.start(
        eng, "127.0.0.1", 0, sample_period_s=0.05, tls=ServerTls.from_dir(folder, True)
    )

    class _NoHeartbeat:
        def __init__(self, *a: Any, **k: Any) -> None: ...
        async def start(self) -> None: ...
        async def stop(self) -> None: ...

    async def _no_registry(*a: Any, **k: Any) -> None:
        return None

    monkeypatch.setattr(deployments, "RayRegistryDiscovery", lambda *a, **k: StaticDiscovery([ep.address]))
    monkeypatch.setattr(deployments, "RegistryHeartbeat", _NoHeartbeat)
    monkeypatch.setattr(deployments, "aget_registry", _no_registry)
    pool = {
        "apiVersion": "corral.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {
            "models": [{"name": "tiny", "baseModel": "tiny", "engine": "sim", "maxModelLen": 4096}],
            "gpuClasses": [{"name": "h100", "minReplicas": 1, "maxReplicas": 1, "profile": "H100"}],
        },
    }
    opts = ServeOptions(router_host="127.0.0.1", router_grpc_port=0, router_http_port=0,
                        router_tls_dir=folder, router_client_auth=True, engine_tls_dir=folder)  # fmt: skip
    plan = plan_pool(pool, None, opts)
    assert all(e.init_kwargs["tls_dir"] == folder for e in plan.engines)
    cls: Any = RouterDeployment.func_or_class
    r = cls.__new__(cls)
    await r.__init__(**plan.router.init_kwargs)
    try:
        await r.reconfigure(plan.router.user_config)
        await r.server.wait_for_replicas(1, timeout=15)  # reached over mutual TLS
        assert r.server.http_url.startswith("https://")
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        status, out = await _post(r.server.http_url + "/v1/completions", body, _client_ssl(certs))
        assert status == 200, out
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await _post(r.server.http_url + "/v1/completions", body, _client_ssl(certs, False))
    finally:
        await r.__del__()
        await ep.stop(None)
        await eng.close()


async def test_standalone_router_cli_tls_flags(certs: Certs, tmp_path: Path) -> None:
    """``python -m corral.router.server`` with --tls-* / --engine-* and a digest key file: HTTPS with a key
    works end to end; a missing certificate file is one line naming it (exit 2)."""
    import subprocess
    import sys

    from corral.router.server.auth import append_key

    keys = tmp_path / "keys.yaml"
    key = append_key(keys, "tenant-a")
    folder = Path(certs.ca).parent
    eng = sim.SimEndpointEngine.create("H100", "h100-c", MODEL, time_scale=20.0, max_model_len=8192)
    ep = await EngineEndpoint.start(
        eng, "127.0.0.1", 0, sample_period_s=0.05, tls=ServerTls.from_dir(folder, True)
    )
    base = [
        sys.executable,
        "-m",
        "corral.router.server",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--no-uvloop",
    ]
    bad = subprocess.run([*base, "--tls-cert", str(tmp_path / "none.crt"), "--tls-key", certs.server_key],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "none.crt" in bad.stderr, bad.stderr
    tls = ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key]
    link = ["--engine-ca", certs.ca, "--engine-cert", certs.server_cert, "--engine-key", certs.server_key]
    proc = await asyncio.create_subprocess_exec(
        *base, "--engines", ep.address, "--api-keys", str(keys), *tls, *link,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "http https://" in line, line
        url = line.split("http ", 1)[1].split()[0]
        ctx = ClientTls(certs.ca).ssl_context()
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # until the router has reached the engine over mutual TLS
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, ssl=ctx
                ) as resp,
            ):
                if resp.status == 200:
                    break
                assert resp.status in (404, 503), await resp.text()  # no engine reached yet
            assert asyncio.get_running_loop().time() < deadline, "the router never reached the TLS engine"
            await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        await proc.wait()
        await ep.stop(None)


async def test_explain_cli_speaks_mtls(
    tls_fleet: tuple[RouterServer, list[EngineEndpoint]], certs: Certs
) -> None:
    import sys

    r, _eps = tls_fleet
    base = [sys.executable, "-m", "corral.api.cli", "explain", "--router", r.grpc_address, "--model", MODEL,
            "--prompt", "hello"]  # fmt: skip

    async def run(*extra: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(
            *base, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(p.communicate(), 60)
        return p.returncode or 0, out.decode(), err.decode()

    rc, out, err = await run("--ca", certs.ca, "--cert", certs.client_cert, "--key", certs.client_key)
    assert rc == 0 and "dry run" in out, err
    rc, out, err = await run("--timeout", "3")  # plaintext to a TLS port
    assert rc == 1 and "UNAVAILABLE" in err


async def test_a_renewed_certificate_serves_new_connections_without_a_restart(tmp_path: Path) -> None:
    """The server's files replaced (as cert-manager renews a Secret, here with a new CA): new HTTPS and gRPC
    connections get the new certificate, clients trusting only the old CA are refused; no restart."""
    import shutil

    from corral.bench.certs import make_certs

    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    for f in ("tls.crt", "tls.key"):
        shutil.copy(Path(old.ca).parent / f, live / f)
    tls = ServerTls(str(live / "tls.crt"), str(live / "tls.key"), reload_s=0.05)
    r = RouterServer([], RouterConfig())
    await r.start("127.0.0.1", 0, 0, tls=tls)

    async def https_ok(ca: str) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(r.http_url + "/health", ssl=ClientTls(ca).ssl_context()) as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, ssl.SSLError):
            return False

    async def grpc_ok(ca: str) -> bool:
        async with grpc.aio.secure_channel(r.grpc_address, ClientTls(ca).grpc_credentials()) as ch:
            try:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
                return True
            except grpc.aio.AioRpcError:
                return False

    try:
        assert await https_ok(old.ca) and await grpc_ok(old.ca)
        assert not await https_ok(new.ca) and not await grpc_ok(new.ca)
        for f in ("tls.crt", "tls.key"):  # one file at a time: the pair mismatches for a moment
            tmp = live / f"{f}.new"
            shutil.copy(Path(new.ca).parent / f, tmp)
            os.replace(tmp, live / f)
        deadline = asyncio.get_running_loop().time() + 20
        while not (await https_ok(new.ca) and await grpc_ok(new.ca)):
            assert asyncio.get_running_loop().time() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.05)
        assert not await https_ok(old.ca) and not await grpc_ok(old.ca)
    finally:
        await r.stop(0)
