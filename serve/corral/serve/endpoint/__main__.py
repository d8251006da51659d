"""``python -m corral.serve.endpoint``: one sim engine replica as its own process, serving the
``corral.v1.Engine`` gRPC service (what a Ray Serve engine replica runs, without Ray).

For standalone routers (``python -m corral.router.server --engines ...``), fault tests and benchmarks
that kill, stop or restart an engine process. Prints one line ``corral engine: REPLICA grpc HOST:PORT``
once it serves, and stops cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from corral.router.signals import stop_on_signals

from .server import EngineEndpoint
from .sim import SimEndpointEngine


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m corral.serve.endpoint", description=__doc__)
    ap.add_argument("--model", required=True, help="base model name the replica serves")
    ap.add_argument("--replica-id", required=True)
    ap.add_argument("--profile", default="H100", help="GPU performance profile (H100, A100-80GB, L4, ...)")
    ap.add_argument("--gpu-class", default=None, help="GPU class (default: the profile's name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="sim speed-up over wall-clock time")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--sample-period", type=float, default=0.1, help="seconds between load samples")
    ap.add_argument(
        "--adapter-cache",
        default=None,
        metavar="DIR",
        help="fetch and validate file:// adapter sources into DIR on first use, as the vLLM engine does",
    )
    ap.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> int:
        eng = SimEndpointEngine.create(
            ns.profile,
            ns.replica_id,
            ns.model,
            time_scale=ns.time_scale,
            max_loras=ns.max_loras,
            gpu_class=ns.gpu_class,
            max_model_len=ns.max_model_len,
            adapter_cache_dir=ns.adapter_cache,
        )
        try:
            ep = await EngineEndpoint.start(eng, ns.host, ns.port, sample_period_s=ns.sample_period)
        except OSError as e:
            print(f"corral engine: {e}", file=sys.stderr)
            return 2
        print(f"corral engine: {ns.replica_id} grpc {ep.address}", flush=True)
        stop = stop_on_signals()
        await stop.wait()
        await ep.stop(None)
        await eng.close()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
