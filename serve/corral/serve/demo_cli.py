"""``corral demo``: start a local fleet from the manifests, send a short realistic workload through the
router's OpenAI API (shared system prompts, multi-turn conversations, LoRA adapters) with a live table of
requests, prefix hit rate, adapter loads and TTFT, then stop; exit code 0 on success."""

from __future__ import annotations

import argparse

from .cli import add_local_arguments, local_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="Start a local demo fleet and send requests.",
        description=__doc__,
    )
    add_local_arguments(p)
    p.add_argument("--conversations", type=int, default=40, help="conversations (default 40)")
    p.add_argument("--turns", type=int, default=5, help="turns per conversation (default 5)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .local import demo_main

    return demo_main(args.filename, local_options(args), conversations=args.conversations, turns=args.turns)
