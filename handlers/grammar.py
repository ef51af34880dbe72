"""The command grammar shared by `starchart` (CLI) and `/ml` (Slack, console): one parser, built from the table."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any, Protocol

from handlers.table import Arguments, Table


class Declared(Protocol):
    """What the grammar needs of a command (or of one of the CLI's processes)."""

    @property
    def name(self) -> str: ...
    @property
    def help(self) -> str: ...
    @property
    def arguments(self) -> Arguments: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...


class Usage(Exception):
    """A command that does not parse; its text is the usage to show."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Usage(f"{self.prog}: {message}")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, and arguments it does not know are refused with the command's hint (`unknown_hint`)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            hint = getattr(parsed, UNKNOWN_HINT, None)
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" — {hint}" if hint else ""))
        return parsed


UNKNOWN_HINT = "unknown_hint"  # a command's default: what to say of arguments its grammar does not know


def model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL")
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="model name (StarChart flag)")


def request_id(text: str) -> int:
    value = text.lstrip("#").upper().removeprefix("R")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"invalid promotion request id {text!r} (use the number, e.g. 7)")
    return int(value)


def model_of(args: argparse.Namespace) -> str:
    model = args.model_opt or args.model_pos
    if not model:
        raise Usage(f"starchart {args.command}: a model is required (MODEL or -m MODEL)")
    return model


def build_parser(table: Table, prog: str = "starchart", cli: bool = True, extra: Iterable[Declared] = ()) -> Parser:
    """The whole grammar from the table; `cli` adds the CLI's global --user/--json and `extra` (its processes)."""
    parser = Parser(prog=prog, description="Train, expose, review and apply TensorFlow models.", add_help=cli)
    parents: list[Parser] = []
    if cli:
        parser.add_argument("--user", help="who is acting (default: $STARCHART_USER or local:<login>)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        # `starchart approve 3 --user U` as well as `starchart --user U approve 3`
        common = Parser(add_help=False)
        common.add_argument("--user", default=argparse.SUPPRESS, help="who is acting")
        common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        parents.append(common)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    declared: list[Declared] = [*table.declared(), *extra]
    for command in declared:
        p = sub.add_parser(command.name, help=command.help, parents=parents)
        command.arguments(p, cli)
        for alias in command.aliases:  # own entries, so `args.command` keeps the word typed and help lists it
            command.arguments(sub.add_parser(alias, help=f"alias of {command.name}", parents=parents), cli)
    return parser
