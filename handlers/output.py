"""Where answers go: the five things a surface does with a result. Slack and the terminal implement it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: the Slack listeners load this before the results' module (bot.app)
    from handlers.results import Form, HomeTab, Result


@dataclass(frozen=True)
class Posted:
    """Where a posted message landed: its channel and timestamp (Slack's message id)."""

    channel: str
    ts: str


@dataclass(frozen=True)
class Upload:
    """A file for the conversation: text (`content`) or bytes (`data`)."""

    filename: str
    title: str
    content: str | None = None
    data: bytes | None = None
    comment: Result | None = None  # shown with the file (rendered by the surface)


class Output(Protocol):
    """One person's conversation: messages in channels, answers only they see, files and forms."""

    def post(self, channel: str, message: Result, thread_ts: str | None = None) -> Posted:
        """A message in a channel, seen by everyone there."""
        ...

    def update(self, channel: str, ts: str, message: Result) -> None:
        """Replace a message the bot posted."""
        ...

    def ephemeral(self, message: Result) -> None:
        """An answer only the person who acted sees."""
        ...

    def upload(self, channel: str, upload: Upload, thread_ts: str | None = None) -> None:
        """A file in a channel (or a thread)."""
        ...

    def open_form(self, form: Form) -> None:
        """A form for the person who acted (the reason of a rejection, the instance a Try answers)."""
        ...


class HomeOutput(Protocol):
    """A person's own page in the chat app (Slack's Home tab)."""

    def publish_home(self, user: str, home: HomeTab) -> None:
        """Replace what `user` sees on their Home tab."""
        ...
