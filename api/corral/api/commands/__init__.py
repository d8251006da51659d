"""Registry of ``corral`` subcommands; each lives in its own module, imported only when it runs.

This module owns the :class:`Command` table. A command module provides::

    def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        p = subparsers.add_parser("NAME", help="...", description="...")
        ...add arguments...
        p.set_defaults(func=run)        # run(args: argparse.Namespace) -> int (exit code)
        return p

A command's ``extra`` is the ``corral[EXTRA]`` it needs: when a third-party module is missing, whether at
import or when the command imports it lazily while running, ``corral`` prints one line naming the extra.
Commands of other components (``bench``, ``serve``, ``demo``, ``explain``) are listed here by
module path only, so ``corral validate`` never imports Ray or kopf; ``corral --help`` lists them without
importing anything. To add a command, add a :class:`Command` row below (or call :func:`register`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, the module that implements it, one line of help, the extra it needs."""

    name: str
    module: str
    help: str
    extra: str | None = None


_COMMANDS: dict[str, Command] = {}


def register(command: Command, *, replace: bool = False) -> None:
    """Add a subcommand; a second one with the same name is an error unless ``replace``."""
    if command.name in _COMMANDS and not replace:
        raise ValueError(f"corral command {command.name!r} is already registered")
    _COMMANDS[command.name] = command


def commands() -> list[Command]:
    """Registered subcommands in registration order."""
    return list(_COMMANDS.values())


def unregister(name: str) -> None:
    _COMMANDS.pop(name, None)


for _cmd in (
    Command("validate", "corral.api.commands.validate", "Validate Corral custom resources offline."),
    Command("crds", "corral.api.commands.crds", "Print the CRDs (--out DIR writes them, --check compares)."),
    Command("version", "corral.api.commands.version", "Print the Corral and API versions."),
    # Implemented by other components; the module paths are the contract (change them here if they move).
    Command("operator", "corral.operator.cli", "Run the Kubernetes operator (kopf, KubeRay).", "operator"),
    Command("doctor", "corral.operator.doctor", "Check a cluster for what Corral needs, with the fixes."),
    Command("serve", "corral.serve.cli", "Run Corral on a Ray cluster (router + engines).", "serve"),
    Command("bench", "corral.serve.bench_cli", "Run the router and fleet benchmarks.", "serve"),
    Command("demo", "corral.serve.demo_cli", "Start a local demo fleet and send requests.", "serve"),
    Command("explain", "corral.router.explain_cli", "Explain a routing decision and cost terms.", "router"),
    Command("replay", "corral.router.replay_cli", "Replay a decision log through a model-selection policy."),
    Command(
        "router",
        "corral.router.backends.cli",
        "Run a router in front of OpenAI servers (vLLM, SGLang).",
        "router",
    ),
    Command(
        "keys", "corral.router.keys_cli", "Make and check tenant API key files (stored as digests).", "router"
    ),
):
    register(_cmd)
