"""``python -m corral.router.server --engines ADDR,... --policy corral``: run a router locally."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

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


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.router.server", description=__doc__)
    ap.add_argument("--engines", default="", help="comma-separated engine endpoint addresses host:port")
    ap.add_argument("--policy", default="corral")
    ap.add_argument("--policy-param", action="append", type=_param, default=[], metavar="KEY=VALUE")
    ap.add_argument("--index-mode", choices=["approximate", "precise"], default="approximate")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=50050)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--api-keys", default=None, help="YAML/JSON file mapping API key -> tenant")
    ap.add_argument("--stale-after", type=float, default=1.0, help="seconds of engine silence before removal")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ns.no_uvloop:
        install_uvloop()
    cfg = RouterConfig(
        policy=ns.policy,
        policy_params=dict(ns.policy_param),
        index_mode=ns.index_mode,
        api_keys=load_api_keys(ns.api_keys) if ns.api_keys else None,
        stale_after_s=ns.stale_after,
    )
    engines = [a.strip() for a in ns.engines.split(",") if a.strip()]

    async def run() -> None:
        server = RouterServer(engines, cfg)
        await server.start(ns.host, ns.grpc_port, ns.http_port)
        print(
            f"corral router: grpc {server.grpc_address}  http {server.http_url}  policy {ns.policy}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
