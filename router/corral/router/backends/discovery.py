"""Where OpenAI-compatible backends come from: a static list of URLs or a Kubernetes Service's EndpointSlices.

Both are :class:`~corral.router.engine_client.Discovery` sources whose ``endpoints()`` are backend URLs
(``http://host:port``), optionally prefixed with a GPU class as ``CLASS=URL`` (the cost model's profile;
without it the pool's default class is used).

:class:`EndpointSliceDiscovery` lists the EndpointSlices labelled ``kubernetes.io/service-name=NAME`` with
the official ``kubernetes`` client (in-cluster config, else the current kubeconfig) and yields one URL per
ready endpoint address and the Service's port (by name, else the only / first port).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ..engine_client import Discovery


def normalize_url(spec: str) -> str:
    """``[CLASS=]URL`` with a scheme added when missing (``host:port`` -> ``http://host:port``)."""
    cls, sep, url = spec.partition("=")
    if not sep or "://" in cls:
        cls, url = "", spec
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return f"{cls}={url}" if cls else url


class StaticBackends(Discovery):
    """A fixed (or edited, in tests) list of backend URLs."""

    def __init__(self, urls: Sequence[str] = (), poll_interval_s: float = 1.0) -> None:
        self.urls = [normalize_url(u) for u in urls if u.strip()]
        self.poll_interval_s = poll_interval_s

    async def endpoints(self) -> Sequence[str]:
        return list(self.urls)


class EndpointSliceDiscovery(Discovery):
    """Ready endpoints of Service ``name`` in ``namespace`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        namespace: str = "default",
        port: str | int | None = None,
        scheme: str = "http",
        gpu_class: str = "",
        poll_interval_s: float = 2.0,
        api_client: Any = None,
    ) -> None:
        self.name, self.namespace, self.port = name, namespace, port
        self.scheme, self.gpu_class = scheme, gpu_class
        self.poll_interval_s = poll_interval_s
        self._client = api_client
        self._own_client = api_client is None  # close only a client made here

    def _api(self) -> Any:
        from kubernetes import client, config

        if self._client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._client = client.ApiClient()
        return client.DiscoveryV1Api(self._client)

    def _list(self) -> list[str]:
        slices = self._api().list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={self.name}"
        )
        out: list[str] = []
        for s in slices.items:
            port = self._pick_port(s.ports or [])
            if port is None:
                continue
            for ep in s.endpoints or []:
                cond = ep.conditions
                if cond is not None and cond.ready is False:
                    continue
                for addr in ep.addresses or []:
                    host = f"[{addr}]" if ":" in addr else addr
                    url = f"{self.scheme}://{host}:{port}"
                    out.append(f"{self.gpu_class}={url}" if self.gpu_class else url)
        return sorted(set(out))

    def _pick_port(self, ports: list[Any]) -> int | None:
        if isinstance(self.port, int):
            return self.port
        for p in ports:
            if self.port is None or p.name == self.port:
                return int(p.port) if p.port is not None else None
        return None

    async def endpoints(self) -> Sequence[str]:
        return await asyncio.to_thread(self._list)

    async def close(self) -> None:
        if self._client is not None and self._own_client:
            await asyncio.to_thread(self._client.close)
            self._client = None
