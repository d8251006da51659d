"""TLS for the router's fronts (HTTP, gRPC with optional mTLS) and for router <-> engine gRPC.

Certificates come from PEM files, in practice a Kubernetes ``kubernetes.io/tls`` Secret mounted as a
folder (``tls.crt``, ``tls.key``, optional ``ca.crt``; see :meth:`ServerTls.from_dir`). A server re-reads
its files when they change (checked at most every ``reload_s``, default 10 s: a certificate renewed into
the Secret, e.g. by cert-manager, serves new connections without a restart; a broken renewal is logged
naming the file and the previous certificate stays). A client (the router dialling engines) reads its
files when a channel is made. Errors name the file and what is wrong with it; nothing here logs key
material.

::

    tls = ServerTls("tls.crt", "tls.key", client_ca_file="ca.crt")   # client_ca_file: clients need a cert
    await router_server.start("0.0.0.0", 50050, 8443, tls=tls)        # https:// and a TLS gRPC port
    EnginePool(..., engine_tls=ClientTls(ca_file="ca.crt"))           # engines over TLS (mTLS with cert)
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TLS_CERT, TLS_KEY, CA_CERT = "tls.crt", "tls.key", "ca.crt"  # a kubernetes.io/tls Secret's keys

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A certificate or key file that is missing or unreadable: the message names it."""


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"{what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _dir_files(folder: str | Path) -> tuple[str, str, str | None]:
    d = Path(folder)
    ca = d / CA_CERT
    return str(d / TLS_CERT), str(d / TLS_KEY), str(ca) if ca.exists() else None


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate and key; with ``client_ca_file`` clients must present a certificate signed by
    that CA (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    reload_s: float = 10.0  # how often the files are checked for a renewed certificate

    @classmethod
    def from_dir(cls, folder: str | Path, mtls: bool = False) -> ServerTls:
        """From a mounted ``kubernetes.io/tls`` Secret; ``mtls``: require client certificates signed by its
        ``ca.crt``."""
        cert, key, ca = _dir_files(folder)
        if mtls and ca is None:
            raise TlsConfigError(f"{folder}: mutual TLS needs the client CA in {CA_CERT}")
        return cls(cert, key, ca if mtls else None)

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP front (aiohttp)."""
        _read(self.cert_file, "TLS certificate")
        _read(self.key_file, "TLS key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise TlsConfigError(
                f"TLS certificate {self.cert_file} / key {self.key_file}: {e.reason or e} (do they match?)"
            ) from None
        if self.client_ca_file is not None:
            _read(self.client_ca_file, "client CA")
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For a gRPC server (the router's API, an engine endpoint); new connections get a renewed
        certificate (gRPC asks at each handshake; the files are checked at most every ``reload_s``)."""
        watch = _Watch(self)
        first = self._grpc_config()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if not watch.changed():
                return None
            try:
                cfg = self._grpc_config()
            except TlsConfigError as e:
                log.warning("TLS certificate not reloaded, keeping the previous one: %s", e)
                return None
            log.info("TLS certificate reloaded from %s (gRPC)", self.cert_file)
            return cfg

        return grpc.dynamic_ssl_server_credentials(
            first, fetch, require_client_authentication=self.client_ca_file is not None
        )

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        self.ssl_context()  # the same checks, with the same messages, before gRPC's own opaque ones
        cert, key = _read(self.cert_file, "TLS certificate"), _read(self.key_file, "TLS key")
        assert cert is not None and key is not None
        ca = _read(self.client_ca_file, "client CA")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    async def keep_fresh(self, ctx: ssl.SSLContext) -> None:
        """Reload renewed files into ``ctx`` (the HTTP front's) until cancelled: new connections get the new
        certificate. (A new client CA is added to the trusted ones; one taken out stays until a restart.)"""
        watch = _Watch(self)
        while True:
            await asyncio.sleep(self.reload_s)
            if not watch.changed(force=True):
                continue
            try:
                self.ssl_context()  # validate the new files as a whole before touching the live context
                ctx.load_cert_chain(self.cert_file, self.key_file)
                if self.client_ca_file is not None:
                    ctx.load_verify_locations(self.client_ca_file)
            except (TlsConfigError, ssl.SSLError, OSError) as e:
                log.warning("TLS certificate not reloaded, keeping the previous one: %s", e)
                continue
            log.info("TLS certificate reloaded from %s (HTTPS)", self.cert_file)


class _Watch:
    """Whether a server's certificate files changed since the last look (at most every ``reload_s``)."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self.sig = self._sig()
        self.checked = time.monotonic()

    def _sig(self) -> tuple[tuple[int, int, int] | None, ...]:
        out = []
        for f in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file):
            try:
                st = os.stat(f) if f else None  # follows a mounted Secret's ..data symlink
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_ino, st.st_size) if st else None)
        return tuple(out)

    def changed(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self.checked < self.tls.reload_s:
            return False
        self.checked = now
        sig = self._sig()
        if sig == self.sig:
            return False
        self.sig = sig
        return True


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A client's view: the CA that signed the servers (None: the system's roots), an optional client
    certificate (mutual TLS) and an optional server name to check instead of the address's host (engines
    are dialled by IP; their certificate may name a Service instead)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsConfigError("a client certificate needs both its certificate and its key file")

    @classmethod
    def from_dir(cls, folder: str | Path, server_name: str | None = None) -> ClientTls:
        cert, key, ca = _dir_files(folder)
        has_cert = Path(cert).exists()
        return cls(ca, cert if has_cert else None, key if has_cert else None, server_name)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA certificate"),
            private_key=_read(self.key_file, "client TLS key"),
            certificate_chain=_read(self.cert_file, "client TLS certificate"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def ssl_context(self) -> ssl.SSLContext:
        """For an HTTP client (aiohttp ``ssl=``)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def secure_channel(address: str, tls: ClientTls | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """A gRPC channel to ``address``: TLS when ``tls`` is set, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.grpc_credentials(), options=options + tls.channel_options())


def router_tls(cfg: Mapping[str, Any]) -> tuple[ServerTls | None, ClientTls | None]:
    """(the fronts' TLS, the engine link's client TLS) from ``{"router_dir", "client_auth", "engine_dir",
    "engine_server_name"}`` (the Serve router's ``tls`` argument, from ``ServeOptions``)."""
    front = (
        ServerTls.from_dir(cfg["router_dir"], bool(cfg.get("client_auth"))) if cfg.get("router_dir") else None
    )
    eng = (
        ClientTls.from_dir(cfg["engine_dir"], cfg.get("engine_server_name"))
        if cfg.get("engine_dir")
        else None
    )
    return front, eng
