"""What every listener gets: the core, a renderer, a background runner, and who/where the request came from."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from model_registry.errors import StarchartError

log = logging.getLogger("starchart.handlers")


@dataclass
class Deps:
    """Wired by the composition root (bot.app): handlers never construct their collaborators."""

    registry: Any          # model_registry.workflow.Registry
    render: Any            # bot.blocks: Block Kit rendering and Slack's size budget
    background: Callable[[Callable[[], None]], None]
    watch: Callable[[Callable[[], None]], None] | None = None  # long waits (a training to its end); default: background
    user_name: Callable[[str], str | None] = lambda _user: None
    follow_interval: float = 2.0  # seconds between progress checks of a training message
    running_update_every: float = 15.0  # seconds between "running (elapsed)" edits


@dataclass
class Ctx:
    """One invocation: a slash command, a click or a modal submission."""

    user: str
    channel: str | None
    client: Any                      # slack_sdk.WebClient or the console's stand-in
    respond: Callable[..., Any]      # ephemeral reply to the person who acted
    trigger_id: str | None = None
    message_ts: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ephemeral(self, text: str, blocks: list[dict[str, Any]] | None = None) -> None:
        self.respond(text=text, blocks=blocks, response_type="ephemeral", replace_original=False)


def report_error(deps: Deps, ctx: Ctx, exc: BaseException) -> None:
    """Tell the person what went wrong; log unexpected errors with their traceback."""
    if isinstance(exc, StarchartError):
        text, blocks = deps.render.error(exc.message, exc.hint)
    else:
        log.error("background work failed for %s in %s:\n%s", ctx.user, ctx.channel,
                  "".join(traceback.format_exception(exc)))
        slack_error = getattr(getattr(exc, "response", None), "get", lambda _k: None)("error")
        hint = _slack_hint(slack_error) if slack_error else "the error is in the bot's log; try again or ask an admin"
        text, blocks = deps.render.error(f"something went wrong: {slack_error or type(exc).__name__}", hint)
    try:
        ctx.ephemeral(text, blocks)
    except Exception:  # the reply channel itself failed: the log has it
        log.exception("could not report an error to %s", ctx.user)


def _slack_hint(code: str) -> str:
    return {
        "not_in_channel": "invite the bot to the channel (/invite @StarChart) and try again",
        "channel_not_found": "the channel does not exist or the bot cannot see it; check `channel` in starchart.yaml",
        "ratelimited": "Slack is rate limiting the bot; try again in a minute",
        "invalid_auth": "SLACK_BOT_TOKEN is wrong or revoked",
    }.get(code, f"Slack answered '{code}'")


def run_reported(deps: Deps, ctx: Ctx, work: Callable[[], None], long: bool = False) -> None:
    """Run `work` in the background (`long`: on its own thread); any error reaches the user and the log."""

    def job() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, none swallowed
            report_error(deps, ctx, exc)

    (deps.watch if long and deps.watch else deps.background)(job)
