"""The ``corral`` command line: argparse with subcommands from :mod:`corral.api.commands`.

Only the module of the subcommand being run is imported (see :mod:`corral.api.commands` for how to add
one), so ``corral validate`` and ``corral crds`` stay free of Ray, kopf and the other components.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands import Command, commands
from .helptext import plain


def _selected(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the ``selected`` command's module is imported and fully configured."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Corral: serve many LLMs and LoRA adapters on Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in commands():
        if cmd.name == selected:
            p = _load(cmd).add_parser(sub)
            if isinstance(p, argparse.ArgumentParser):  # docstring descriptions: no raw reST in --help
                p.description = plain(p.description)
        else:
            sub.add_parser(cmd.name, help=cmd.help, add_help=False)
    return parser


class CommandUnavailableError(RuntimeError):
    """The module of a command (or one of its dependencies) is not installed."""


def _load(cmd: Command):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if cmd.extra and _is_missing_dependency(exc):
            raise CommandUnavailableError(f"{_needs_extra(cmd)} (missing module '{exc.name}')") from exc
        hint = f" (install corral[{cmd.extra}])" if cmd.extra else ""
        raise CommandUnavailableError(f"command '{cmd.name}' is unavailable: {exc}{hint}") from exc


def _needs_extra(cmd: Command) -> str:
    return (
        f"corral {cmd.name} needs the '{cmd.extra}' extra: pip install 'corral[{cmd.extra}]' "
        f"(Corral is not on PyPI: name its wheel or checkout, e.g. pip install '.[{cmd.extra}]')"
    )


def _is_missing_dependency(exc: ModuleNotFoundError) -> bool:
    """A third-party module is absent (not a missing module of corral itself: that is a bug)."""
    return exc.name is not None and exc.name.split(".")[0] != "corral"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_selected(args_list))
    except CommandUnavailableError as exc:
        print(str(exc) if str(exc).startswith("corral ") else f"corral: {exc}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(args_list)
    if unknown:  # reported with the subcommand's usage, not the top-level one
        sub = _subparser(parser, args.command)
        (sub or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr if args.command is None else sys.stdout)
        return 2
    try:
        return int(func(args))
    except ModuleNotFoundError as exc:  # an extra's dependency imported lazily by the command
        cmd = next((c for c in commands() if c.name == args.command), None)
        if cmd is None or not cmd.extra or not _is_missing_dependency(exc):
            raise
        print(f"{_needs_extra(cmd)} (missing module '{exc.name}')", file=sys.stderr)
        return 2


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]  # type: ignore[no-any-return]
    return None


if __name__ == "__main__":
    sys.exit(main())
