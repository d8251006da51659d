"""``corral serve``: run a ModelPool (+ RoutingPolicy) locally on Ray Serve, or print its Serve config.

``corral serve -f manifests/examples/`` starts a local Ray, deploys the pools (simulated engines + the
router) and prints the router's addresses; Ctrl-C stops everything. ``--print-config`` prints the Serve
config file (``ServeDeploySchema`` YAML) instead, for ``serve deploy`` or a RayService's ``serveConfigV2``.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_local_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``corral serve`` and ``corral demo``."""
    p.add_argument(
        "-f", "--filename", action="append", required=True, metavar="PATH",
        help="ModelPool / RoutingPolicy YAML file or folder (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--max-replicas-per-class", type=int, default=2, metavar="N",
        help="cap engine replicas per (model, GPU class) for a small machine (default 2; 0 = no cap)",
    )  # fmt: skip
    p.add_argument("--router-replicas", type=int, default=1, metavar="N", help="router replicas (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="router bind host (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=0, help="router gRPC port (default: a free port)")
    p.add_argument("--http-port", type=int, default=0, help="router HTTP port (default: a free port)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument(
        "--engine", choices=["sim", "echo", "vllm"], default=None,
        help="run every model on this engine (default: sim; vllm needs GPUs and corral[vllm])",
    )  # fmt: skip
    p.add_argument(
        "--sim-speed", type=float, default=1.0, metavar="X",
        help="run the simulated engines X times faster than wall clock (default 1)",
    )  # fmt: skip


def local_options(args: argparse.Namespace) -> Any:
    from .local import LocalOptions

    return LocalOptions(
        max_replicas_per_class=args.max_replicas_per_class or None,
        router_replicas=args.router_replicas,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        num_cpus=args.num_cpus,
        engine=args.engine,
        sim_time_scale=args.sim_speed,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="Run Corral on a local Ray cluster (router + engines).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_local_arguments(p)
    p.add_argument(
        "--print-config", action="store_true",
        help="print the Serve config (ServeDeploySchema YAML) for these manifests and exit",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .local import load_manifests, serve_main

    if args.print_config:
        import yaml

        from .app import ServeOptions, plan_pool, serve_config

        opts = ServeOptions(router_grpc_port=args.grpc_port or 50051, router_http_port=args.http_port or 8080)
        plans = [plan_pool(pool, policy, opts) for pool, policy in load_manifests(args.filename)]
        print(yaml.safe_dump(serve_config(plans), sort_keys=False), end="")
        return 0
    return serve_main(args.filename, local_options(args))
