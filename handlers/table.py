"""The shape of the command table: a command, one invocation of it, and the table the surfaces dispatch through."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from handlers.results import Result

if TYPE_CHECKING:
    from model_registry.bootstrap import Core


class Surface(enum.Enum):
    """Where a command was typed: the CLI waits and writes folders; chat posts, follows and uploads."""

    CLI = "cli"
    CHAT = "chat"


def _ignore(_result: Result) -> None:
    """No progress to show."""


def _nobody(_user: str) -> str | None:
    return None


@dataclass
class Invocation:
    """One run of a command: who, what was typed (parsed), and what the surface offers while it runs."""

    core: Core
    user: str
    args: argparse.Namespace
    trainer_args: list[str] | None = None
    surface: Surface = Surface.CHAT
    progress: Callable[[Result], None] = _ignore  # intermediate results: `train --wait` lines, a card to refresh
    user_name: Callable[[str], str | None] = _nobody  # display names recorded with decisions
    read_stdin: Callable[[], str] | None = None  # the CLI's `predict MODEL -`
    channel: str | None = None  # a click's or a form's card
    message_ts: str | None = None
    outbox: bool = False  # messages to channels are recorded for the outbox (Slack), not shown by the surface
    home: bool = False  # a click on the person's Home tab (not on a message)


Arguments = Callable[[argparse.ArgumentParser, bool], None]


def no_arguments(_parser: argparse.ArgumentParser, _cli: bool) -> None:
    """A command that takes no arguments."""


@dataclass(frozen=True)
class Command:
    """A command, declared once: its words (`arguments(parser, cli)` adds them), the use case, its help."""

    name: str
    help: str
    run: Callable[[Invocation], Result]
    arguments: Arguments = no_arguments
    aliases: tuple[str, ...] = ()


@dataclass
class Table:
    """Every command, by name and alias; the grammar is built from it, so a command added here is everywhere."""

    commands: dict[str, Command] = field(default_factory=dict)
    _changed: list[Callable[[], None]] = field(default_factory=list)

    def add(self, command: Command) -> Command:
        for name in (command.name, *command.aliases):
            if name in self.commands:
                raise ValueError(f"command {name!r} is declared twice")
            self.commands[name] = command
        self._notify()
        return command

    def remove(self, name: str) -> None:
        command = self.commands[name]
        for key in (command.name, *command.aliases):
            self.commands.pop(key, None)
        self._notify()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called after add/remove (the grammar caches its parsers)."""
        self._changed.append(listener)

    def _notify(self) -> None:
        for listener in self._changed:
            listener()

    def __getitem__(self, name: str) -> Command:
        return self.commands[name]

    def __contains__(self, name: object) -> bool:
        return name in self.commands

    def names(self) -> list[str]:
        return list(self.commands)

    def declared(self) -> Iterator[Command]:
        """Each command once (aliases folded), in declaration order."""
        seen: set[str] = set()
        for command in self.commands.values():
            if command.name not in seen:
                seen.add(command.name)
                yield command

    def run(self, inv: Invocation) -> Result:
        return self[inv.args.command].run(inv)

