"""What the composition root (bot.app, bot.console) wires into the handlers: handlers never construct their
collaborators. Light on purpose: bot.app builds it before the command table has loaded."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handlers.follow import Follower
    from model_registry.bootstrap import Core


def _nobody(_user: str) -> str | None:
    return None


@dataclass
class Deps:
    """The core and how the surface around the handlers behaves."""

    core: Core
    follower: Follower | None = None  # the console's: a training's message followed in the foreground
    outbox: bool = False  # Slack: the messages the bot sends on its own are recorded for the outbox
    user_name: Callable[[str], str | None] = _nobody
    # the work that follows an ack runs in it (a listener's whole body): lets other requests be acked first
    pace: Callable[[], AbstractContextManager[None]] = nullcontext
    team_id: str | None = None  # the installed workspace; when set, a person of another one is refused
