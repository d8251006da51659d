"""``corral serve``: run a ModelPool (+ RoutingPolicy) locally on Ray Serve, or print its Serve config.

``corral serve -f manifests/examples/`` reads the manifests as ``corral validate`` does, starts a local
Ray, deploys the pools (simulated engines + the router) and prints the router's addresses; Ctrl-C stops
everything. ``--print-config`` prints the Serve config file (``ServeDeploySchema`` YAML) instead, for
``serve deploy`` or a RayService's ``serveConfigV2``.

What a user can fix (a missing path, an empty folder, bad YAML, an invalid object, a port in use, a
deployment that fails) is reported as one line, ``corral serve: ...``, with exit code 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .local_stack import LocalOptions, LocalStack, RouterAddress

Pairs = Sequence[tuple[dict[str, Any], dict[str, Any] | None]]  # (ModelPool, RoutingPolicy) CR dicts


def add_local_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``corral serve`` and ``corral demo``."""
    p.add_argument(
        "-f", "--filename", action="append", required=True, metavar="PATH",
        help="ModelPool / RoutingPolicy YAML file or folder (repeatable; read as `corral validate` does)",
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
    p.add_argument(
        "--api-keys", default=None, metavar="FILE",
        help="tenant API key file (digests: `corral keys add`) for a RoutingPolicy that sets spec.tenants",
    )  # fmt: skip
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="serve the routers' HTTPS and gRPC with DIR/tls.crt and DIR/tls.key")  # fmt: skip
    p.add_argument("--client-auth", action="store_true",
                   help="with --tls-dir: clients need a certificate signed by DIR/ca.crt")  # fmt: skip
    p.add_argument("--engine-tls-dir", default=None, metavar="DIR",
                   help="router <-> engine mutual TLS with DIR/{tls.crt,tls.key,ca.crt}")  # fmt: skip


def local_options(args: argparse.Namespace) -> LocalOptions:
    from .local_stack import LocalOptions

    return LocalOptions(
        max_replicas_per_class=args.max_replicas_per_class or None,
        router_replicas=args.router_replicas,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        num_cpus=args.num_cpus,
        engine=args.engine,
        sim_time_scale=args.sim_speed,
        api_keys_file=_api_keys_file(args.api_keys),
        **_tls_options(args),
    )


def _tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """ServeOptions' TLS fields from --tls-dir / --client-auth / --engine-tls-dir, the folders checked here
    (absolute paths: the routers and engines read them)."""
    from corral.router.tls import ServerTls, TlsConfigError

    from .app import PlanError

    if args.client_auth and not args.tls_dir:
        raise PlanError("--client-auth needs --tls-dir")
    out: dict[str, Any] = {"router_client_auth": bool(args.client_auth)}
    dirs = (
        ("--tls-dir", "router_tls_dir", args.tls_dir, args.client_auth),
        ("--engine-tls-dir", "engine_tls_dir", args.engine_tls_dir, True),
    )
    for flag, key, folder, mtls in dirs:
        if folder:
            try:
                ServerTls.from_dir(folder, mtls).ssl_context()
            except TlsConfigError as e:
                raise PlanError(f"{flag} {folder}: {e}") from None
            out[key] = str(Path(folder).resolve())
    return out


def _api_keys_file(path: str | None) -> str | None:
    """The ``--api-keys`` file as an absolute path, checked here (the routers read it on start)."""
    if not path:
        return None
    from corral.router.server import load_api_keys

    from .app import PlanError

    try:
        load_api_keys(path)  # a missing or malformed file fails now, not in the router replicas
    except (OSError, ValueError) as e:
        raise PlanError(f"--api-keys {path}: {e}") from None
    return str(Path(path).resolve())


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


def reported(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user-fixable failure becomes one line on stderr and exit code 1."""
    from .app import PlanError
    from .local_stack import LocalStackError
    from .manifests import ManifestError

    try:
        return body()
    except (ManifestError, LocalStackError, PlanError) as e:
        print(f"corral {command}: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    return reported("serve", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from .manifests import load_manifests

    pairs = load_manifests(args.filename)  # before anything heavy: errors in the input come first
    if args.print_config:
        import yaml

        from .app import ServeOptions, plan_pool, serve_config

        opts = ServeOptions(
            router_grpc_port=args.grpc_port or 50051,
            router_http_port=args.http_port or 8080,
            api_keys_file=_api_keys_file(args.api_keys),
            **_tls_options(args),
        )
        plans = [plan_pool(pool, policy, opts) for pool, policy in pairs]
        print(yaml.safe_dump(serve_config(plans), sort_keys=False), end="")
        return 0
    return serve_main(pairs, local_options(args))


# ---- shared by serve and demo -------------------------------------------------------------------------


def _progress_printer(console: Any) -> tuple[Any, Callable[[dict[str, tuple[int, int]]], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    prog = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(state: dict[str, tuple[int, int]]) -> None:
        for name, (running, target) in state.items():
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=target)
            prog.update(tasks[name], completed=min(running, target), total=target)

    return prog, update


def start_stack(
    pairs: Sequence[tuple[dict[str, Any], Any]], options: LocalOptions, console: Any
) -> LocalStack:
    """Build the stack for the loaded manifests, start it with a progress display; stop it on failure."""
    from .local_stack import LocalStack

    stack = LocalStack(pairs, options, log=console.print)
    for plan in stack.plans:
        console.print(f"[bold]pool {plan.pool_id}[/]: " + "; ".join(plan.summary()))
    for n in stack.notes:
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"starting a local Ray cluster (GPU-class resources: {stack.resources()})")
    prog, update = _progress_printer(console)
    try:
        with prog:
            stack.start(update)
    except BaseException:
        stack.stop()
        raise
    return stack


def print_addresses(stack: LocalStack, console: Any) -> list[RouterAddress]:
    out = []
    for plan in stack.plans:
        for r in stack.routers(plan.pool_id):
            console.print(f"[green]ready[/] pool [bold]{plan.pool_id}[/] router {r.router_id}")
            console.print(f"  HTTP (OpenAI): [bold]{r.http}[/]   e.g. curl {r.http}/v1/models")
            console.print(f"  gRPC:          [bold]{r.grpc}[/]   (corral.v1.Router)")
            out.append(r)
    return out


def try_next(router: RouterAddress, model: str, console: Any) -> None:
    """Commands to try against a running router."""
    body = f'{{"model": "{model}", "prompt": "Hello, who are you?", "max_tokens": 16}}'
    console.print("[bold]try next[/] (while the router runs):")
    for line in (
        f"curl -s {router.http}/v1/completions -H 'content-type: application/json' -d '{body}'",
        f"corral explain --router {router.grpc} --model {model} --prompt 'Hello, who are you?'",
        f"curl -s {router.http}/metrics | grep ^corral_",
    ):
        console.print("  " + line, markup=False, highlight=False, soft_wrap=True)


def stop_on_sigterm() -> None:
    """Treat SIGTERM (systemd, Kubernetes, ``timeout``) like Ctrl-C: the same clean stop of the local cluster.
    Installed after Ray started, so it replaces the handler Ray's driver sets (which only dumps a stack)."""

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)


def serve_main(pairs: Pairs, options: LocalOptions) -> int:
    """``corral serve``: run until Ctrl-C."""
    from rich.console import Console

    console = Console()
    stack = start_stack(pairs, options, console)
    stop_on_sigterm()
    try:
        routers = print_addresses(stack, console)
        if routers:
            models = [m["name"] for m in stack.plans[0].router.init_kwargs["models"]]
            try_next(routers[0], models[0] if models else "MODEL", console)
        console.print("serving; press Ctrl-C (or send SIGTERM) to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()
    return 0
