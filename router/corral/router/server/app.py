"""``RouterServer``: one process serving the router's gRPC and OpenAI-compatible HTTP fronts.

::

    server = RouterServer(StaticDiscovery(["127.0.0.1:50051"]), RouterConfig(policy="corral"))
    await server.start(host="127.0.0.1", grpc_port=0, http_port=0)
    server.grpc_address, server.http_url
    server.update_policy("least_loaded", {})    # live, from Serve reconfigure(user_config)
    await server.stop()
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core import DispatchHook
from ..engine_client import Discovery, StaticDiscovery
from ..settings import RouterSettings
from ..tls import ServerTls
from .auth import KeyStore
from .core import Router, RouterConfig
from .grpc_api import GrpcApi
from .http_api import HttpApi


def load_api_keys(path: str | Path, poll_s: float = 1.0) -> KeyStore:
    """The tenants' API key file (digests only; format in :mod:`.auth`), watched and reloaded when it
    changes. Raises :class:`~.auth.KeyFileError` (a ``ValueError`` naming the line) or ``OSError``."""
    return KeyStore.from_file(path, poll_s)


class RouterServer:
    """A router process: engine discovery + event streams, policy, and the gRPC/HTTP fronts."""

    def __init__(
        self,
        discovery: Discovery | Iterable[str],
        config: RouterConfig | None = None,
        on_dispatch: DispatchHook | None = None,
        **pool_kw: Any,
    ) -> None:
        if not isinstance(discovery, Discovery):
            discovery = StaticDiscovery(list(discovery))
        self.discovery = discovery
        self.router = Router(discovery, config, on_dispatch, **pool_kw)
        self.grpc = GrpcApi(self.router)
        self.http = HttpApi(self.router)
        self.grpc_address = ""
        self.http_url = ""
        self._tls_task: asyncio.Task[None] | None = None

    @property
    def fleet(self) -> Any:
        return self.router.fleet

    async def start(
        self,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        *,
        http: bool = True,
        tls: ServerTls | None = None,
    ) -> RouterServer:
        """Serve gRPC and HTTP; with ``tls`` both fronts are TLS (mTLS when it names a client CA). The
        certificates are checked before anything starts (a :class:`~corral.router.tls.TlsConfigError`)."""
        creds = tls.grpc_credentials() if tls is not None else None
        ctx = tls.ssl_context() if tls is not None else None
        await self.router.start()
        self.grpc_address = await self.grpc.start(host, grpc_port, creds)
        if http:
            self.http_url = await self.http.start(host, http_port, ctx)
            if tls is not None and ctx is not None:  # renewed certificates reach new HTTPS connections
                self._tls_task = asyncio.create_task(tls.keep_fresh(ctx), name="corral-tls-reload")
        return self

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
            self._tls_task = None
        await self.http.stop()
        await self.grpc.stop(grace)
        await self.router.stop()

    def update_policy(self, strategy: str, params: dict[str, Any] | None = None) -> None:
        """Swap the routing policy live (no state dropped, engines untouched)."""
        self.router.update_policy(strategy, params)

    def configure(self, settings: RouterSettings) -> None:
        """Apply the CRs' translation (:func:`corral.router.settings.router_settings`) live."""
        self.router.configure(settings)

    def set_api_keys(self, keys: KeyStore | dict[str, str] | None) -> None:
        self.router.set_api_keys(keys)

    async def wait_for_replicas(self, n: int, timeout: float = 10.0, model: str | None = None) -> None:
        await self.router.pool.wait_for_replicas(n, timeout, model)
