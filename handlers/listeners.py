"""The Bolt listeners: `/ml`, every button, the reject and Try forms, the Home tab — plus one middleware that acks
and one error handler.

Bolt runs each listener on its listener executor after the ack, so a listener is hand-off → run → deliver;
whatever it raises reaches `report` (@app.error): told to the person, logged with a traceback when unexpected.
Registering and acking need only this module and the light ones it imports: a listener reaches the command table
and the renderers (handlers.chat) when it runs, by which time bot.app has loaded them beside the core.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from handlers.deps import Deps
from handlers.forms import REJECT_VIEW, TRY_VIEW, form_card, form_home
from handlers.output import HomeOutput, Output

if TYPE_CHECKING:
    from handlers.chat import Chat

log = logging.getLogger("starchart.handlers")
SIGNATURE_KEY = "starchart_signature"  # the verified request's signature, put in Bolt's context by the verifier
SIGNATURE_WINDOW = 2 * 5 * 60.0  # seconds a taken signature is remembered: twice Slack's five-minute tolerance

class Conversation(Output, HomeOutput, Protocol):
    """The person's conversation and their Home tab (Slack has both)."""


# (request body, the WebClient, Bolt's respond or None, channel) -> the person's conversation
Outputs = Callable[[dict[str, Any], Any, Any, "str | None"], Conversation]


def on_home(body: dict[str, Any]) -> bool:
    """Whether a click came from the person's Home tab, or a reject form was opened there."""
    if body.get("type") == "view_submission":
        return form_home((body.get("view") or {}).get("private_metadata") or "")
    view = body.get("view")
    return isinstance(view, dict) and view.get("type") == "home"


def where(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(user, channel, message ts) of a slash command, a click, a form submission or an event (app_home_opened)."""
    container = body.get("container") or {}
    person, event = body.get("user"), body.get("event")
    user = str(body.get("user_id") or (person.get("id") if isinstance(person, dict) else "")
               or (event.get("user") if isinstance(event, dict) and body.get("type") == "event_callback" else "")
               or "")
    channel = body.get("channel_id") or (body.get("channel") or {}).get("id") or container.get("channel_id")
    if body.get("type") == "view_submission":
        channel, ts = form_card((body.get("view") or {}).get("private_metadata") or "")
        return user, channel, ts
    return user, channel, container.get("message_ts") or (body.get("message") or {}).get("ts")


def team_of(body: dict[str, Any]) -> str | None:
    """The workspace of the person who acted: a command's team_id, a payload's team or the user's own team."""
    team, person = body.get("team"), body.get("user")
    found = body.get("team_id") or (team.get("id") if isinstance(team, dict) else None) or (
        person.get("team_id") if isinstance(person, dict) else None)
    return str(found) if found else None


def register(app: Any, deps: Deps, outputs: Outputs) -> None:
    """Attach the listeners to a Bolt app."""

    def chat(body: dict[str, Any], client: Any, respond: Any) -> tuple[Chat, Conversation]:
        from handlers.chat import Chat

        user, channel, ts = where(body)
        out = outputs(body, client, respond, channel)
        return Chat(user=user, channel=channel, out=out, message_ts=ts, team=team_of(body), home=on_home(body)), out

    def taken(context: dict[str, Any]) -> bool:
        """Whether this signed request was acted on before (a replay, on any replica): then it is dropped.

        Checked after the ack, in the listener's `deps.pace()` turn like the rest of its work, so that acks never
        wait for the database (or a core still loading): its write competes with their acks otherwise.
        """
        signature = context.get(SIGNATURE_KEY)
        if not signature:
            return False  # Socket Mode: no signature, and nothing to replay over the socket
        try:
            first = deps.core.audit.first_sight(signature, window=SIGNATURE_WINDOW)
        except Exception:  # the database is down: act (as before) rather than drop Slack's request
            log.exception("could not check a Slack request for a replay")
            return False
        if not first:
            log.warning("acked a replayed Slack request (signature seen already) without acting on it")
        return not first

    @app.middleware
    def ack_first(body: dict[str, Any], ack: Any, next: Callable[[], None]) -> None:  # noqa: A002 - Bolt's name
        # Acked before any listener runs; a form is acked by its listener, whose answer may be "say why".
        if body.get("type") != "view_submission":
            ack()
        next()

    @app.error
    def report(error: BaseException, body: dict[str, Any], client: Any, respond: Any = None) -> None:
        from handlers.chat import failure_of, report_error, show_home

        person, out = chat(body, client, respond)
        if not person.home:
            report_error(out, error)
            return
        try:  # the Home tab has no conversation to answer in: it shows what went wrong itself
            with deps.pace():
                show_home(deps, person, out, notice=failure_of(error))
        except Exception:
            log.exception("could not show an error on the Home tab of %s", person.user)

    @app.command("/ml")
    def ml_command(body: dict[str, Any], client: Any, respond: Any, context: dict[str, Any]) -> None:
        from handlers.chat import dispatch

        with deps.pace():
            if taken(context):
                return
            dispatch(deps, chat(body, client, respond)[0], body.get("text") or "")

    @app.action(re.compile(".*"))  # every button: known ones run from the action table, others are refused
    def button(body: dict[str, Any], action: dict[str, Any], client: Any, respond: Any,
               context: dict[str, Any]) -> None:
        from handlers.chat import click, show_home

        with deps.pace():
            if taken(context):
                return
            person, out = chat(body, client, respond)
            click(deps, person, action.get("action_id"), action.get("value"))
            if person.home:  # a decision on the Home tab: it shows the request gone (or what is left of it)
                show_home(deps, person, out)

    @app.event("app_home_opened")
    def home_opened(body: dict[str, Any], event: dict[str, Any], client: Any, context: dict[str, Any]) -> None:
        from handlers.chat import show_home

        if event.get("tab") != "home":  # the Messages tab sends this event too
            return
        with deps.pace():
            if taken(context):
                return
            person, out = chat(body, client, None)
            show_home(deps, person, out)

    @app.view(REJECT_VIEW)
    def reject_view(ack: Any, body: dict[str, Any], view: dict[str, Any], client: Any,
                    context: dict[str, Any]) -> None:
        values = (view.get("state") or {}).get("values") or {}
        reason = ((values.get("reason") or {}).get("reason") or {}).get("value") or ""
        if not reason.strip():
            ack(response_action="errors", errors={"reason": "Say why you reject it."})
            return
        ack()
        from handlers.chat import show_home, submit_reject

        with deps.pace():
            if taken(context):
                return
            person, out = chat(body, client, None)
            submit_reject(deps, person, view.get("private_metadata") or "", reason)
            if person.home:
                show_home(deps, person, out)

    @app.view(TRY_VIEW)
    def try_view(ack: Any, body: dict[str, Any], view: dict[str, Any], client: Any,
                 context: dict[str, Any]) -> None:
        values = (view.get("state") or {}).get("values") or {}
        texts = {block: str((fields.get("value") or {}).get("value") or "") for block, fields in values.items()}
        metadata = view.get("private_metadata") or ""
        from handlers.chat import submit_try
        from handlers.reviews import try_instance  # its field errors are said with the ack

        instance, errors = try_instance(metadata, texts)
        if errors:  # said in the form, next to the field, before anything runs
            ack(response_action="errors", errors=errors)
            return
        ack()
        with deps.pace():
            if taken(context):
                return
            submit_try(deps, chat(body, client, None)[0], metadata, instance)
