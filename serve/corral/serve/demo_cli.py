"""``corral demo``: start a local fleet from the manifests, send a short realistic workload through the
router's OpenAI API (shared system prompts, multi-turn conversations, LoRA adapters) with a live table of
requests, prefix hit rate, adapter loads, TTFT and requests per engine replica, then stop (or, with
``--keep-running``, keep serving); exit code 0 on success."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .cli import (
    Pairs,
    add_local_arguments,
    local_options,
    print_addresses,
    reported,
    start_stack,
    stop_on_sigterm,
    try_next,
)

if TYPE_CHECKING:
    from .local_stack import LocalOptions


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="Start a local demo fleet and send requests.",
        description=__doc__,
    )
    add_local_arguments(p)
    p.add_argument("--conversations", type=int, default=40, help="conversations (default 40)")
    p.add_argument("--turns", type=int, default=5, help="turns per conversation (default 5)")
    p.add_argument(
        "--demo-key", default=None, metavar="KEY",
        help="with --api-keys: the API key the demo's requests send (one `corral keys add` printed; an admin "
        "key also lets the live table read the router's /metrics)",
    )  # fmt: skip
    p.add_argument(
        "--keep-running", action="store_true",
        help="after the workload, keep the fleet serving until Ctrl-C (to try the printed commands)",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        from .app import PlanError
        from .manifests import load_manifests

        pairs = load_manifests(args.filename)
        if args.api_keys and not args.demo_key:
            raise PlanError(
                "--api-keys turns tenant authentication on, so the demo's requests need a key: add "
                "--demo-key KEY (a key of that file, as `corral keys add FILE --tenant T` printed it)"
            )
        return demo_main(
            pairs,
            local_options(args),
            args.conversations,
            args.turns,
            keep_running=args.keep_running,
            paths=args.filename,
            api_key=args.demo_key,
        )

    return reported("demo", body)


def demo_main(
    pairs: Pairs,
    options: LocalOptions,
    conversations: int = 40,
    turns: int = 5,
    keep_running: bool = False,
    paths: Sequence[str] = (),
    api_key: str | None = None,
) -> int:
    """Start the stack, run the workload with a live table, then stop; exit 0 on success."""
    from rich.console import Console
    from rich.live import Live

    from .demo import TOPICS, DemoStats, demo_workload, stats_table

    console = Console()
    stack = start_stack(pairs, options, console)
    stop_on_sigterm()
    try:
        routers = print_addresses(stack, console)
        plan = stack.plans[0]
        models = [m["name"] for m in plan.router.init_kwargs["models"]]
        adapters = [a["name"] for a in plan.router.user_config["adapters"]]
        total = conversations * turns
        console.print(
            f"sending {total} requests: {conversations} conversations x {turns} turns over "
            f"{len(TOPICS)} shared system prompts, models {', '.join(models)}, {len(adapters)} adapters"
        )
        t0 = time.monotonic()
        with Live(stats_table(DemoStats(), total, 0.0), console=console, refresh_per_second=4) as live:

            def update(s: DemoStats) -> None:
                live.update(stats_table(s, total, time.monotonic() - t0))

            stats = asyncio.run(
                demo_workload(routers[0].http, models, adapters, conversations=conversations, turns=turns,
                              on_update=update, api_key=api_key)
            )  # fmt: skip
            update(stats)
        if stats.errors:
            console.print(f"[red]{stats.errors} request(s) failed[/]; last error: {stats.last_error}")
        ok = stats.done > 0 and stats.errors <= max(1, total // 50)
        console.print()
        console.print("[green]demo finished[/]" if ok else "[red]demo failed[/]")
        target = (adapters or models or ["MODEL"])[0]
        if keep_running:
            try_next(routers[0], target, console)
            console.print("serving; press Ctrl-C to stop")
            while True:
                time.sleep(3600)
        f = " ".join(f"-f {p}" for p in paths) or "-f PATH"
        hints = [
            (f"corral demo {f} --keep-running", "then curl / corral explain the still-running router"),
            (f"corral serve {f}", "just the fleet, with its router addresses"),
            ("corral bench fleet --quick", "every routing policy on a simulated fleet (~1 min)"),
        ]
        width = max(len(c) for c, _ in hints)
        console.print("[bold]try next:[/]")
        for cmd, what in hints:
            console.print(f"  {cmd:<{width}}   # {what}", markup=False, highlight=False, soft_wrap=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        console.print("stopping the local cluster…")
        stack.stop()
