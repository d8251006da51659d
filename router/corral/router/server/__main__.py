"""``python -m corral.router.server --engines ADDR,... --policy corral``: run a router locally."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from typing import Any

from corral.api.models import ModelPool, RoutingPolicy
from corral.api.validation import validate_paths

from ..core import RouterCore
from ..settings import RouterSettings, router_settings
from ..signals import stop_on_signals
from ..tls import ClientTls, ServerTls
from ..tokenizer import load_tokenizer
from .app import RouterServer, load_api_keys
from .core import RouterConfig


def _param(s: str) -> tuple[str, Any]:
    k, sep, v = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    val: Any = v
    for conv in (int, float):
        try:
            val = conv(v)
            break
        except ValueError:
            continue
    if v.lower() in ("true", "false"):
        val = v.lower() == "true"
    return k, val


def _settings(paths: list[str]) -> RouterSettings:
    """RouterSettings from RoutingPolicy/ModelPool files, validated exactly as ``corral validate`` does."""
    if not paths:
        return router_settings(None)
    report = validate_paths(paths)
    if not report.ok:
        raise ValueError("; ".join(str(p) for p in report.problems[:5]))
    policies = [o for o in report.objects if isinstance(o, RoutingPolicy)]
    pools = [o for o in report.objects if isinstance(o, ModelPool)]
    if len(policies) > 1 or len(pools) > 1:
        raise ValueError(f"{', '.join(paths)}: expected at most one RoutingPolicy and one ModelPool")
    pool = pools[0] if pools else None
    if policies and pool is not None and policies[0].spec.pool_ref != pool.metadata.name:
        raise ValueError(
            f"RoutingPolicy {policies[0].metadata.name} routes pool '{policies[0].spec.pool_ref}', "
            f"not the ModelPool '{pool.metadata.name}' given with it"
        )
    return router_settings(policies[0] if policies else None, pool)


def _shadow(path: str) -> Any:
    """The modelSelection of the RoutingPolicy in ``path`` (shadow mode), validated as corral validate."""
    report = validate_paths([path])
    if not report.ok:
        raise ValueError("; ".join(str(p) for p in report.problems[:5]))
    policies = [o for o in report.objects if isinstance(o, RoutingPolicy)]
    if len(policies) != 1:
        raise ValueError(f"--shadow-policy {path}: expected one RoutingPolicy, found {len(policies)}")
    return policies[0].spec.model_selection


def _config(ns: argparse.Namespace) -> RouterConfig:
    s = _settings(ns.routing_policy)
    if ns.policy is not None or ns.policy_param:
        s = replace(s, strategy=ns.policy or s.strategy, policy_params=dict(ns.policy_param))
    if ns.index_mode is not None:
        s = replace(s, index_mode=ns.index_mode)
    if s.tenant_secret is not None and not ns.api_keys:
        raise ValueError(
            f"the RoutingPolicy sets spec.tenants (Secret {s.tenant_secret[0]}, key {s.tenant_secret[1]}): "
            "give that Secret's content with --api-keys FILE, or the router would serve without keys"
        )
    cfg = RouterConfig.from_settings(
        s,
        api_keys=load_api_keys(ns.api_keys) if ns.api_keys else None,
        stale_after_s=ns.stale_after,
        selection_state_dir=ns.selection_state,
        selection_log=ns.selection_log,
        shadow_selection=_shadow(ns.shadow_policy) if ns.shadow_policy else None,
    )
    RouterCore(s)  # a bad strategy or param fails here, as one line, before anything listens
    uris = {m.name: m.tokenizer for m in s.models.values() if m.tokenizer} | dict(ns.tokenizer)
    cfg.tokenizers = {model: load_tokenizer(str(uri)) for model, uri in uris.items()}
    return cfg


def _tls(ns: argparse.Namespace) -> tuple[ServerTls | None, ClientTls | None]:
    """The fronts' and the engine link's TLS from the flags, their files checked now (one-line errors)."""
    tls = engine_tls = None
    if ns.tls_cert or ns.tls_key or ns.tls_client_ca:
        if not (ns.tls_cert and ns.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (--tls-client-ca needs both)")
        tls = ServerTls(ns.tls_cert, ns.tls_key, ns.tls_client_ca)
        tls.ssl_context()
    if ns.engine_ca or ns.engine_cert or ns.engine_key or ns.engine_server_name:
        engine_tls = ClientTls(ns.engine_ca, ns.engine_cert, ns.engine_key, ns.engine_server_name)
        engine_tls.grpc_credentials()
    return tls, engine_tls


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m corral.router.server", description=__doc__)
    ap.add_argument("--engines", default="", help="comma-separated engine endpoint addresses host:port")
    ap.add_argument(
        "-f",
        "--routing-policy",
        action="append",
        default=[],
        metavar="PATH",
        help="RoutingPolicy (and its ModelPool) YAML file or folder: route exactly as deployed "
        "(strategy, SLO, index mode, queue bound, tenants, adapters, tokenizers, GPU-class profiles)",
    )
    ap.add_argument("--policy", default=None, help="strategy (default: the RoutingPolicy's, else corral)")
    ap.add_argument("--policy-param", action="append", type=_param, default=[], metavar="KEY=VALUE")
    ap.add_argument("--index-mode", choices=["approximate", "precise"], default=None)
    ap.add_argument(
        "--tokenizer",
        action="append",
        type=_param,
        default=[],
        metavar="MODEL=PATH",
        help="tokenizer.json (or its folder) for a model (default: spec.models[].tokenizer, else the "
        "engine's own, else the simulator's)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=50050, help="gRPC port (default 50050; 0 = any free)")
    ap.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = any free)")
    ap.add_argument(
        "--api-keys",
        default=None,
        help="tenants' API key file (SHA-256 digests; `corral keys add`), re-read when it changes",
    )
    tls = ap.add_argument_group(
        "TLS (PEM files; a mounted kubernetes.io/tls Secret has tls.crt, tls.key, ca.crt)"
    )
    tls.add_argument("--tls-cert", default=None, help="serve HTTPS and gRPC over TLS with this certificate")
    tls.add_argument("--tls-key", default=None, help="the private key of --tls-cert")
    tls.add_argument(
        "--tls-client-ca", default=None, help="require client certificates signed by this CA (mTLS)"
    )
    tls.add_argument("--engine-ca", default=None, help="dial engines over TLS, trusting this CA")
    tls.add_argument("--engine-cert", default=None, help="client certificate for engines that require mTLS")
    tls.add_argument("--engine-key", default=None, help="the private key of --engine-cert")
    tls.add_argument("--engine-server-name", default=None, help="name to check in engine certificates")
    ap.add_argument("--stale-after", type=float, default=1.0, help="seconds of engine silence before removal")
    ap.add_argument(
        "--selection-state",
        default=None,
        metavar="DIR",
        help="folder for the model-selection bandits' state (spec.modelSelection): kept across restarts "
        "and shared by the routers (and --workers) that use the same folder; default: in memory only",
    )
    ap.add_argument(
        "--selection-log",
        default=None,
        metavar="FILE",
        help="append model-selection decisions and feedback to this JSONL file (records request text, "
        "tenant and x-* headers) for `corral replay`; default: off",
    )
    ap.add_argument(
        "--shadow-policy",
        default=None,
        metavar="FILE",
        help="shadow mode: also evaluate this RoutingPolicy's modelSelection for every selected request and "
        "log/explain what it would have chosen (requests still go where the live policy says)",
    )
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="router worker processes sharing the ports (SO_REUSEPORT), each rebuilding state from the "
        "engines (default 1)",
    )
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for each worker
    ap.add_argument("--log-level", default="INFO")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _config(ns)
        tls, engine_tls = _tls(ns)
    except (OSError, ValueError) as e:
        print(f"corral router: {e}", file=sys.stderr)
        return 2
    if ns.workers < 1:
        print(f"corral router: --workers must be >= 1 (got {ns.workers})", file=sys.stderr)
        return 2
    if not ns.no_uvloop:
        install_uvloop()
    if ns.workers > 1:
        from .workers import run_workers

        args = list(sys.argv[1:] if argv is None else argv)
        return asyncio.run(run_workers(args, ns.workers, ns.host, ns.grpc_port, ns.http_port, cfg.policy))
    engines = [a.strip() for a in ns.engines.split(",") if a.strip()]

    async def run() -> int:
        server = RouterServer(engines, cfg, engine_tls=engine_tls)
        server.grpc.reuse_port = server.http.reuse_port = ns.reuse_port
        try:
            await server.start(ns.host, ns.grpc_port, ns.http_port, tls=tls)
        except OSError as e:  # a port in use, an address not on this machine
            await server.stop(0)
            print(
                f"corral router: cannot listen on {ns.host} (gRPC port {ns.grpc_port}, HTTP port "
                f"{ns.http_port}): {e.strerror or e}; pick free ports with --grpc-port/--http-port (0 = any)",
                file=sys.stderr,
            )
            return 2
        if not engines:
            print(
                "corral router: no --engines given: every request gets 503 until engines are listed",
                file=sys.stderr,
            )
        print(
            f"corral router: grpc {server.grpc_address}  http {server.http_url}  policy {cfg.policy}",
            flush=True,
        )
        stop = stop_on_signals()
        await stop.wait()
        await server.stop()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
