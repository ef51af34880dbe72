"""Promotion requests: /ml promote, apply, rollback, approve, reject, show, requests; the card's buttons."""

from __future__ import annotations

import argparse
import json
from typing import Any

from handlers.cards import decide_and_apply, post_card, refresh_card
from handlers.context import Ctx, Deps, run_reported
from handlers.grammar import model_of
from model_registry.errors import InvalidInput, Refused, StarchartError


def promote(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    reg = deps.registry
    if args.command == "promote":
        req = reg.promotions.promote(args.model, args.version, ctx.user, args.reason, channel=None)
    else:
        req = getattr(reg.promotions, args.command)(model_of(args), ctx.user, args.reason)
    req = post_card(deps, ctx, req)
    ctx.ephemeral(f"Promotion request #{req['id']} is open for review in <#{req['channel']}>.")


def decide_command(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    approve = args.command == "approve"
    req = decide_and_apply(deps, ctx, args.request, approve, reason=getattr(args, "reason", None))
    ctx.ephemeral(f"Promotion request #{req['id']} is {req['state']}.")


def show(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    text, blocks = deps.render.request_message(deps.registry.promotions.get(args.request))
    ctx.ephemeral(text, blocks)


def requests(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    model = model_of(args)
    reqs = deps.registry.promotions.of_model(model)
    text, blocks, _ = deps.render.table(f"Promotion requests of {model}", reqs, [
        ("id", "ID"), ("kind", "KIND"), ("candidate", "CANDIDATE"), ("base", "BASE"), ("state", "STATE"),
        ("requested_by", "BY"), ("approvals", "APPROVALS")])
    ctx.ephemeral(text, blocks)


# ---------------------------------------------------------------- buttons and the reject modal

def button_value(deps: Deps, ctx: Ctx, raw: str | None) -> tuple[int, str, str]:
    """(request id, model, card digest) from a button; a malformed or tampered value is refused and recorded."""
    try:
        value = json.loads(raw or "")
        request_id, model, digest = int(value["r"]), str(value["m"]), str(value["d"])
    except (ValueError, TypeError, KeyError) as exc:
        deps.registry.audit.record_refusal(ctx.user, "malformed_value", f"button value {str(raw)[:200]!r}: {exc}",
                                     channel=ctx.channel, message_ts=ctx.message_ts)
        raise InvalidInput("that button's value is malformed", "use the buttons of a card the bot posted") from None
    try:
        actual = deps.registry.promotions.get(request_id)["model"]
    except StarchartError:
        actual = None
    if actual is not None and actual != model:
        deps.registry.audit.record_refusal(ctx.user, "model_mismatch", f"button names {model} but #{request_id} is "
                                     f"{actual}", model=actual, request_id=request_id, channel=ctx.channel,
                                     message_ts=ctx.message_ts)
        raise Refused(f"that button names {model} but promotion request #{request_id} is for {actual}",
                      "use the buttons of the request's own card", reason="model_mismatch")
    return request_id, model, digest


def on_approve(deps: Deps, ctx: Ctx, value: str | None) -> None:
    request_id, _model, digest = button_value(deps, ctx, value)
    decide_and_apply(deps, ctx, request_id, True, card_digest=digest, channel=ctx.channel,
                     message_ts=ctx.message_ts)


def on_reject(deps: Deps, ctx: Ctx, value: str | None) -> None:
    request_id, model, digest = button_value(deps, ctx, value)
    req = deps.registry.promotions.get(request_id)
    if req["state"] != "open":
        raise Refused(f"promotion request #{request_id} is already {req['state']}", "nothing left to decide")
    modal = deps.render.reject_modal({"r": request_id, "m": model, "d": digest}, ctx.channel, ctx.message_ts)
    ctx.client.views_open(trigger_id=ctx.trigger_id, view=modal)


def reject_submission(deps: Deps, ctx: Ctx, metadata: str, reason: str) -> None:
    try:
        meta = json.loads(metadata)
        request_id, digest = int(meta["r"]), str(meta["d"])
    except (ValueError, TypeError, KeyError):
        deps.registry.audit.record_refusal(ctx.user, "malformed_value", f"modal metadata {metadata[:200]!r}")
        raise InvalidInput("the rejection form was malformed", "click Reject on the card again") from None
    ctx.channel, ctx.message_ts = meta.get("c") or ctx.channel, meta.get("t")
    decide_and_apply(deps, ctx, request_id, False, reason=reason, card_digest=digest, channel=meta.get("c"),
                     message_ts=meta.get("t"))


def on_retry(deps: Deps, ctx: Ctx, value: str | None) -> None:
    request_id, _model, _digest = button_value(deps, ctx, value)
    req = deps.registry.promotions.retry(request_id, ctx.user)
    refresh_card(deps, ctx, req)


def click(deps: Deps, ctx: Ctx, handler: Any, value: str | None) -> None:
    run_reported(deps, ctx, lambda: handler(deps, ctx, value))
