"""Chat (Slack and the console): parse what was typed or clicked, run it through the table, deliver the result.

Delivery is by result type: most answers go only to the person who acted; files are uploaded; the Reject button
opens a form. The messages the bot sends on its own (a training's message, a review card and its updates, an audit
checkpoint) are recorded by the core with the change that causes them when `Deps.outbox` is set (Slack: the outbox
delivers them); otherwise (the console) they are shown here, and a training is followed to its end.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import singledispatch
from typing import Any

from handlers.commands import ACTIONS, TABLE
from handlers.deps import Deps
from handlers.grammar import Usage
from handlers.home import home
from handlers.output import HomeOutput, Output, Upload
from handlers.parsing import parse, slack_parser, usage_text
from handlers.results import (
    AuditExport,
    AuditPage,
    CanaryChanged,
    CardPosted,
    Chart,
    Checkpoint,
    CheckpointPosted,
    Decided,
    DefaultAt,
    Failure,
    Help,
    HomeTab,
    JobStarted,
    PulledArchive,
    PulledLite,
    Record,
    RejectForm,
    RequestChanged,
    RequestOpened,
    RequestState,
    Result,
    ReviewCard,
    TrainingMessage,
    TryForm,
    Uploaded,
)
from handlers.reviews import on_reject_reason, on_try_submit
from handlers.table import Invocation, Surface
from model_registry.domain.errors import InvalidInput, Refused, StarchartError

log = logging.getLogger("starchart.handlers")


@dataclass
class Chat:
    """One person acting in one place: who, where (and on which message), and their conversation."""

    user: str
    channel: str | None
    out: Output
    message_ts: str | None = None
    team: str | None = None  # the person's workspace, as Slack sent it
    home: bool = False  # they acted on their Home tab (which is refreshed afterwards)


def require_person(deps: Deps, chat: Chat) -> None:
    """Identity fails closed: nobody without a user id, or from another workspace than the installed one, acts."""
    if not chat.user.strip():
        why, message = "no_user", "Slack did not say who sent this"
    elif deps.team_id and chat.team != deps.team_id:
        why, message = "wrong_team", f"this bot serves workspace {deps.team_id}, not {chat.team or 'an unnamed one'}"
    else:
        return
    deps.core.audit.record_refusal(chat.user.strip() or "unknown", why, message, channel=chat.channel,
                                   message_ts=chat.message_ts, details={"team": chat.team})
    raise Refused(message, "act from the workspace the bot is installed in, signed in as yourself", reason=why)


def invocation(deps: Deps, chat: Chat, args: Any = None, trainer_args: list[str] | None = None) -> Invocation:
    return Invocation(core=deps.core, user=chat.user, args=args, trainer_args=trainer_args, surface=Surface.CHAT,
                      progress=lambda result: deliver(result, deps, chat), user_name=deps.user_name,
                      channel=chat.channel, message_ts=chat.message_ts, outbox=deps.outbox, home=chat.home)


def dispatch(deps: Deps, chat: Chat, text: str) -> Result:
    """One `/ml` command: parsed, run through the table, delivered. Errors other than usage reach the caller."""
    require_person(deps, chat)
    try:
        args, trainer_args = parse(text)
        if args.command is None:
            raise Usage(slack_parser().format_help())
        inv = invocation(deps, chat, args, trainer_args)
        result = TABLE.run(inv)
    except Usage as exc:
        result = Help(usage_text(str(exc)))
    deliver(result, deps, chat)
    return result


def click(deps: Deps, chat: Chat, action_id: str | None, value: str | None) -> Result:
    """A button on one of the bot's messages; an unknown one is refused and recorded."""
    require_person(deps, chat)
    action = ACTIONS.get(action_id or "")
    if action is None:
        deps.core.audit.record_refusal(chat.user, "unknown_action", f"action id {str(action_id)[:100]!r}",
                                       channel=chat.channel, message_ts=chat.message_ts)
        raise InvalidInput("that button is not one this bot knows", "use the buttons of a current card")
    result = action(invocation(deps, chat), value)
    deliver(result, deps, chat)
    return result


def submit_try(deps: Deps, chat: Chat, metadata: str, instance: dict[str, Any]) -> Result:
    """A Try form, answered with an instance: both versions' answers, to the person who tried."""
    return _submitted(deps, chat, lambda inv: on_try_submit(inv, metadata, instance))


def submit_reject(deps: Deps, chat: Chat, metadata: str, reason: str) -> Result:
    """The reject form, answered with a reason."""
    return _submitted(deps, chat, lambda inv: on_reject_reason(inv, metadata, reason))


def _submitted(deps: Deps, chat: Chat, answer: Callable[[Invocation], Result]) -> Result:
    """A form's submission: run for the person who sent it, delivered where the form's card is."""
    require_person(deps, chat)
    inv = invocation(deps, chat)
    result = answer(inv)
    chat.channel, chat.message_ts = inv.channel, inv.message_ts
    deliver(result, deps, chat)
    return result


def show_home(deps: Deps, chat: Chat, page: HomeOutput, notice: Failure | None = None) -> HomeTab:
    """The person's Home tab, published as it stands now (when they open it, and after they act on it); `notice`:
    what went wrong with what they did there. A listener calls it in its `deps.pace()` turn."""
    require_person(deps, chat)
    result = home(invocation(deps, chat), notice)
    page.publish_home(chat.user, result)
    return result


def failure_of(exc: BaseException) -> Failure:
    """What the person is told about an error; an unexpected one is logged with its traceback."""
    if isinstance(exc, StarchartError):
        return Failure(exc.message, exc.hint or "")
    if isinstance(exc, Usage):
        return Failure(usage_text(str(exc)))
    log.error("work failed:\n%s", "".join(traceback.format_exception(exc)))
    slack_error = getattr(getattr(exc, "response", None), "get", lambda _k: None)("error")
    hint = slack_hint(slack_error) if slack_error else "the error is in the bot's log; try again or ask an admin"
    return Failure(f"something went wrong: {slack_error or type(exc).__name__}", hint)


# ---------------------------------------------------------------- delivery, by result type

@singledispatch
def deliver(result: Result, deps: Deps, chat: Chat) -> None:
    """Default: an answer only the person who acted sees."""
    chat.out.ephemeral(result)


@deliver.register
def _training(result: JobStarted, deps: Deps, chat: Chat) -> None:
    if deps.outbox:  # recorded with the job: the outbox posts the message and updates it as the job goes
        if not chat.channel:
            chat.out.ephemeral(result)
        return
    posted = chat.out.post(_where(chat), TrainingMessage(result.job))
    if deps.follower is not None:
        deps.follower.follow(result.job, posted.channel, posted.ts, chat.out)


@deliver.register
def _opened(result: RequestOpened, deps: Deps, chat: Chat) -> None:
    req = result.request if deps.outbox else post_card(deps, chat, result.request)
    if req.get("channel"):
        chat.out.ephemeral(CardPosted(req))
    else:
        chat.out.ephemeral(RequestState(req))


@deliver.register
def _changed(result: RequestChanged, deps: Deps, chat: Chat) -> None:
    if not deps.outbox:  # else the change itself asked the outbox to update the card
        refresh_card(chat, result.request)


@deliver.register
def _decided(result: Decided, deps: Deps, chat: Chat) -> None:
    if not deps.outbox:
        refresh_card(chat, result.request)
    if result.notice:
        chat.out.ephemeral(RequestState(result.request))


@deliver.register
def _canary_changed(result: CanaryChanged, deps: Deps, chat: Chat) -> None:
    if result.notice or not deps.outbox:  # a click in Slack shows on the canary card, updated by the outbox
        chat.out.ephemeral(result)


@deliver.register
def _export(result: AuditExport, deps: Deps, chat: Chat) -> None:
    chat.out.upload(_where(chat), Upload("audit.csv", f"Audit events ({len(result.events)})", content=result.csv()))
    chat.out.ephemeral(Uploaded("audit events", len(result.events), "audit.csv"))


@deliver.register
def _checkpoint(result: Checkpoint, deps: Deps, chat: Chat) -> None:
    channel = result.channel or _where(chat)
    if not deps.outbox:  # else recorded with the checkpoint, for the outbox to post
        chat.out.post(channel, result)
    chat.out.ephemeral(CheckpointPosted(channel))


@deliver.register(PulledArchive)
@deliver.register(PulledLite)
def _archive(result: PulledArchive | PulledLite, deps: Deps, chat: Chat) -> None:
    pulled = result.pulled
    chat.out.upload(_where(chat), Upload(pulled["filename"], pulled["filename"], data=pulled["data"], comment=result))


@deliver.register
def _chart(result: Chart, deps: Deps, chat: Chat) -> None:
    made = result.chart
    chat.out.upload(_where(chat), Upload(made["filename"], made["title"], data=made["png"], comment=result))


@deliver.register(RejectForm)
@deliver.register(TryForm)
def _form(result: RejectForm | TryForm, deps: Deps, chat: Chat) -> None:
    chat.out.open_form(result)


@deliver.register(AuditPage)
@deliver.register(DefaultAt)
def _shareable(result: AuditPage | DefaultAt, deps: Deps, chat: Chat) -> None:
    if result.share:  # --share: the answer goes to the channel
        chat.out.post(_where(chat), result)
    else:
        chat.out.ephemeral(result)


def _where(chat: Chat) -> str:
    if not chat.channel:
        raise InvalidInput("this answer needs a channel", "type the command in a channel")
    return chat.channel


def post_card(deps: Deps, chat: Chat, req: Record) -> Record:
    """Post the review card to the model's channel (or where the command was typed) and remember it (the console;
    Slack's cards go through the outbox)."""
    if req.get("message_ts"):
        refresh_card(chat, req)  # an open twin already has a card: bring it up to date
        return req
    posted = chat.out.post(req.get("channel") or _where(chat), ReviewCard(req))
    deps.core.promotions.set_card(req["id"], posted.channel, posted.ts)
    return {**req, "channel": posted.channel, "message_ts": posted.ts}


def refresh_card(chat: Chat, req: Record) -> None:
    if req.get("message_ts") and req.get("channel"):
        chat.out.update(req["channel"], req["message_ts"], ReviewCard(req))


# ---------------------------------------------------------------- errors

def report_error(out: Output, exc: BaseException) -> None:
    """Tell the person what went wrong; log unexpected errors with their traceback."""
    failure = failure_of(exc)
    try:
        out.ephemeral(failure)
    except Exception:  # the reply channel itself failed: the log has it
        log.exception("could not report an error")


def slack_hint(code: str) -> str:
    """What to do about an error Slack answered, in the words a person acts on."""
    return {
        "not_in_channel": "invite the bot to the channel (/invite @StarChart) and try again",
        "channel_not_found": "the channel does not exist or the bot cannot see it; check `channel` in starchart.yaml",
        "ratelimited": "Slack is rate limiting the bot; try again in a minute",
        "invalid_auth": "SLACK_BOT_TOKEN is wrong or revoked",
        "token_revoked": "SLACK_BOT_TOKEN was revoked; reinstall the app and set the new token",
        "account_inactive": "the bot's Slack account was deactivated; reinstall the app and set the new token",
        "is_archived": "the channel is archived; unarchive it or set another `channel` in starchart.yaml",
        "msg_too_long": "the message is over Slack's size limit; report it to the bot's admins",
        "invalid_blocks": "Slack refused the message's layout; report it to the bot's admins",
    }.get(code, f"Slack answered '{code}'")
