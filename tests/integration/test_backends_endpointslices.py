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
