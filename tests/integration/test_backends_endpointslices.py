"""Backend discovery from a Kubernetes Service's EndpointSlices, against a real kube-apiserver: the ready
addresses of the slices labelled with the Service's name, with the named port, follow changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from corral.router.backends.discovery import EndpointSliceDiscovery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _slice(name: str, service: str, addrs: list[tuple[str, bool]], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
            {"name": "http", "port": port, "protocol": "TCP"},
        ],
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a, ready in addrs],
    }


def test_endpointslice_discovery_lists_ready_backends(k8s_cluster: Any, k8s_namespace: str) -> None:
    ns = k8s_namespace
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "vllm"},
        "spec": {"ports": [{"name": "http", "port": 8000}]},
    }  # no selector: the slices are ours
    assert k8s_cluster.create(svc, ns).status == 201
    r = k8s_cluster.create(_slice("vllm-a", "vllm", [("10.0.0.5", True), ("10.0.0.6", False)], 8000), ns)
    assert r.status == 201, r.message
    other = _slice("other-a", "other", [("10.0.0.9", True)], 8000)
    assert k8s_cluster.create(other, ns).status == 201
    disc = EndpointSliceDiscovery(
        "vllm", ns, port="http", gpu_class="A100-80GB", api_client=k8s_cluster.api_client
    )
    assert asyncio.run(disc.endpoints()) == ["A100-80GB=http://10.0.0.5:8000"]
    # a second slice of the same Service (more replicas) is picked up on the next poll
    r = k8s_cluster.create(_slice("vllm-b", "vllm", [("10.0.0.7", True)], 8000), ns)
    assert r.status == 201, r.message
    assert asyncio.run(disc.endpoints()) == [
        "A100-80GB=http://10.0.0.5:8000",
        "A100-80GB=http://10.0.0.7:8000",
    ]
    # a port by number, no GPU class
    assert asyncio.run(
        EndpointSliceDiscovery("vllm", ns, port=8001, api_client=k8s_cluster.api_client).endpoints()
    ) == ["http://10.0.0.5:8001", "http://10.0.0.7:8001"]


def _host_ipv4() -> str | None:
    """This machine's non-loopback IPv4 address (EndpointSlices refuse loopback ones), if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent: only the route's source address is picked
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_router_follows_a_service_endpointslices(k8s_cluster: Any, k8s_namespace: str) -> None:
    """Fake vLLM workers behind a Service's EndpointSlices (one per port): the router admits both, routes,
    and drops the one whose endpoint turns not ready."""
    from corral.router.backends.pool import BackendPool
    from corral.router.server import RouterConfig, RouterServer
    from corral.serve.fakevllm import FakeVllm, FakeVllmConfig

    ip = _host_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine (EndpointSlices refuse loopback)")
    ns = k8s_namespace
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm"},
           "spec": {"ports": [{"name": "http", "port": 8000}]}}  # fmt: skip
    assert k8s_cluster.create(svc, ns).status == 201

    async def run() -> None:
        workers = [FakeVllm(FakeVllmConfig(decode_s_per_token=0.001), name=f"w{i}") for i in range(2)]
        for w in workers:
            await w.start(ip)
        for i, w in enumerate(workers):
            r = k8s_cluster.apply(_slice(f"vllm-{i}", "vllm", [(ip, True)], w.port), ns)
            assert r.status in (200, 201), r.message
        disc = EndpointSliceDiscovery("vllm", ns, port="http", api_client=k8s_cluster.api_client,
                                      poll_interval_s=0.2)  # fmt: skip
        server = RouterServer(disc, RouterConfig(index_mode="approximate"), pool_cls=BackendPool,
                              scrape_interval_s=0.05)  # fmt: skip
        await server.start()
        try:
            await server.wait_for_replicas(2, 20)
            import aiohttp

            async with aiohttp.ClientSession() as http:
                body = {"model": "llama-8b", "prompt": "hello", "max_tokens": 2}
                async with http.post(server.http_url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
            gone = workers[1]
            r = k8s_cluster.apply(_slice("vllm-1", "vllm", [(ip, False)], gone.port), ns)  # not ready
            assert r.status == 200, r.message
            deadline = asyncio.get_running_loop().time() + 20
            while f"{ip}:{gone.port}" in server.fleet.replicas:
                assert asyncio.get_running_loop().time() < deadline, (
                    "the not-ready endpoint stayed in routing"
                )
                await asyncio.sleep(0.05)
            assert len(server.fleet.replicas) == 1
        finally:
            await server.stop()
            for w in workers:
                await w.stop()

    asyncio.run(run())
