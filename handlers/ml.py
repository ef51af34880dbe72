"""`/ml`: parse the text, dispatch to the command family, answer. Registration of every listener."""

from __future__ import annotations

import re
from typing import Any, Callable

from handlers import audit, reviews, schedules, training, versions
from handlers.context import Ctx, Deps, report_error, run_reported
from handlers.grammar import Usage
from handlers.parsing import parse, slack_parser
from model_registry.names import suggest

COMMANDS: dict[str, Callable[..., None]] = {
    "train": training.train, "state": training.state, "jobs": training.state, "logs": training.logs,
    "cancel": training.cancel, "expose": versions.expose, "versions": versions.versions, "diff": versions.diff,
    "promote": reviews.promote, "apply": reviews.promote, "rollback": reviews.promote,
    "approve": reviews.decide_command, "reject": reviews.decide_command, "show": reviews.show,
    "requests": reviews.requests, "audit": audit.audit, "schedule": schedules.schedule,
    "predict": versions.predict, "pull": versions.pull,
}


def usage_text(message: str) -> str:
    m = re.search(r"invalid choice: '([^']*)'", message)
    if m:
        hint = suggest(m.group(1), list(COMMANDS))
        return f"unknown command '{m.group(1)}'" + (f" — {hint}" if hint else "") + "\n\n" + slack_parser().format_usage()
    return message


def dispatch(deps: Deps, ctx: Ctx, text: str) -> None:
    """Handle one /ml command (already acked). Errors become ephemeral messages."""
    try:
        args, trainer_args = parse(text)
    except Usage as exc:
        ctx.ephemeral(*deps.render.plain_text("/ml", usage_text(str(exc))))
        return
    except Exception as exc:  # InvalidInput and anything unexpected
        report_error(deps, ctx, exc)
        return
    if args.command is None:
        ctx.ephemeral(*deps.render.plain_text("/ml", slack_parser().format_help()))
        return
    handler = COMMANDS[args.command]
    run_reported(deps, ctx, lambda: handler(deps, ctx, args, trainer_args))


def command_ctx(body: dict[str, Any], client: Any, respond: Any) -> Ctx:
    return Ctx(user=body.get("user_id", ""), channel=body.get("channel_id"), client=client, respond=respond,
               trigger_id=body.get("trigger_id"))


def action_ctx(body: dict[str, Any], client: Any, respond: Any) -> Ctx:
    container = body.get("container") or {}
    return Ctx(user=(body.get("user") or {}).get("id", ""),
               channel=(body.get("channel") or {}).get("id") or container.get("channel_id"), client=client,
               respond=respond, trigger_id=body.get("trigger_id"),
               message_ts=container.get("message_ts") or (body.get("message") or {}).get("ts"))


def action_handlers(render: Any) -> dict[str, Callable[..., None]]:
    """Button action id -> handler; Slack and the console click through the same table."""
    return {render.APPROVE: reviews.on_approve, render.REJECT: reviews.on_reject, render.RETRY: reviews.on_retry,
            render.AUDIT_NEXT: audit.on_next}


def register(app: Any, deps: Deps) -> None:
    """Attach every listener to a Bolt app: each acks at once and hands the work to the background."""
    render = deps.render

    @app.command("/ml")
    def ml_command(ack: Any, body: dict[str, Any], client: Any, respond: Any) -> None:
        ack()
        dispatch(deps, command_ctx(body, client, respond), body.get("text") or "")

    def on_button(handler: Callable[..., None]) -> Callable[..., None]:
        def listener(ack: Any, body: dict[str, Any], action: dict[str, Any], client: Any, respond: Any) -> None:
            ack()
            ctx = action_ctx(body, client, respond)
            reviews.click(deps, ctx, handler, action.get("value"))
        return listener

    for action_id, handler in action_handlers(render).items():
        app.action(action_id)(on_button(handler))

    @app.action(re.compile(".*"))
    def unknown_action(ack: Any, body: dict[str, Any], action: dict[str, Any], client: Any, respond: Any) -> None:
        ack()
        ctx = action_ctx(body, client, respond)

        def refuse() -> None:
            deps.registry.audit.record_refusal(ctx.user, "unknown_action", f"action id {str(action.get('action_id'))[:100]!r}",
                                         channel=ctx.channel, message_ts=ctx.message_ts)
            ctx.ephemeral(*render.error("that button is not one this bot knows", "use the buttons of a current card"))

        run_reported(deps, ctx, refuse)

    @app.view(render.REJECT_VIEW)
    def reject_view(ack: Any, body: dict[str, Any], view: dict[str, Any], client: Any) -> None:
        values = (view.get("state") or {}).get("values") or {}
        reason = ((values.get("reason") or {}).get("reason") or {}).get("value") or ""
        if not reason.strip():
            ack(response_action="errors", errors={"reason": "Say why you reject it."})
            return
        ack()
        user = (body.get("user") or {}).get("id", "")

        def respond(text: str = "", blocks: Any = None, **_: Any) -> None:
            client.chat_postEphemeral(channel=ctx.channel, user=user, text=text, blocks=blocks)

        ctx = Ctx(user=user, channel=None, client=client, respond=respond)
        meta = view.get("private_metadata") or ""
        run_reported(deps, ctx, lambda: reviews.reject_submission(deps, ctx, meta, reason))
