"""Promotion requests: promote, apply, rollback, approve, reject, show, requests; the card's buttons and form."""

from __future__ import annotations

import argparse
import json
from typing import Any

from handlers.grammar import model_arg, model_of, request_id
from handlers.results import Decided, RejectForm, RequestChanged, RequestOpened, Requests, RequestShown, Result
from handlers.table import Invocation
from model_registry.domain.errors import InvalidInput, Refused, StarchartError

APPROVE, REJECT, RETRY = "review.approve", "review.reject", "review.retry"
REJECT_VIEW = "review.reject_reason"


# ---------------------------------------------------------------- commands

def promote_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--reason")


def reason_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    model_arg(p)
    p.add_argument("--reason")


def _card(inv: Invocation) -> dict[str, Any]:
    """Through the outbox, the review card is recorded with the request (for the model's channel, else this one)."""
    return {"channel": inv.channel, "card": True} if inv.outbox else {}


def promote(inv: Invocation) -> Result:
    args = inv.args
    return RequestOpened(inv.core.promotions.promote(args.model, args.version, inv.user, args.reason, **_card(inv)))


def apply(inv: Invocation) -> Result:
    """StarChart's apply: a request for the version marked isDefault in models/MODEL.yaml."""
    return RequestOpened(inv.core.promotions.apply(model_of(inv.args), inv.user, inv.args.reason, **_card(inv)))


def rollback(inv: Invocation) -> Result:
    return RequestOpened(inv.core.promotions.rollback(model_of(inv.args), inv.user, inv.args.reason, **_card(inv)))


def request_argument(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("request", type=request_id)


def reject_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    request_argument(p, cli)
    p.add_argument("--reason", required=True)


def decide(inv: Invocation, request: int, approve: bool, *, reason: str | None = None,
           card_digest: str | None = None, notice: bool = True) -> Decided:
    """One decision, then (if it completed the approvals) the application: for every surface, written once."""
    promotions = inv.core.promotions
    req = promotions.decide(request, inv.user, approve, reason=reason, card_digest=card_digest,
                            channel=inv.channel, message_ts=inv.message_ts, actor_name=inv.user_name(inv.user))
    if req["state"] == "approved":
        inv.progress(RequestChanged(req))  # the card says "applying…" while the backend switches
        req = promotions.apply_request(request, actor=inv.user)
    return Decided(req, notice=notice)


def approve(inv: Invocation) -> Result:
    return decide(inv, inv.args.request, True)


def reject(inv: Invocation) -> Result:
    return decide(inv, inv.args.request, False, reason=inv.args.reason)


def show(inv: Invocation) -> Result:
    return RequestShown(inv.core.promotions.get(inv.args.request))


def requests(inv: Invocation) -> Result:
    model = model_of(inv.args)
    return Requests(model, inv.core.promotions.of_model(model))


# ---------------------------------------------------------------- buttons and the reject form

def card_value(req: dict[str, Any]) -> dict[str, Any]:
    """What a card's buttons carry: the request, its model and the digest of what the card shows."""
    return {"r": req["id"], "m": req["model"], "d": req["card_digest"]}


def button_value(inv: Invocation, raw: str | None) -> tuple[int, str, str]:
    """(request id, model, card digest) from a button; a malformed or tampered value is refused and recorded."""
    audit = inv.core.audit
    try:
        value = json.loads(raw or "")
        request, model, digest = int(value["r"]), str(value["m"]), str(value["d"])
    except (ValueError, TypeError, KeyError) as exc:
        audit.record_refusal(inv.user, "malformed_value", f"button value {str(raw)[:200]!r}: {exc}",
                             channel=inv.channel, message_ts=inv.message_ts)
        raise InvalidInput("that button's value is malformed", "use the buttons of a card the bot posted") from None
    try:
        actual = inv.core.promotions.get(request)["model"]
    except StarchartError:
        actual = None
    if actual is not None and actual != model:
        audit.record_refusal(inv.user, "model_mismatch", f"button names {model} but #{request} is {actual}",
                             model=actual, request_id=request, channel=inv.channel, message_ts=inv.message_ts)
        raise Refused(f"that button names {model} but promotion request #{request} is for {actual}",
                      "use the buttons of the request's own card", reason="model_mismatch")
    return request, model, digest


def on_approve(inv: Invocation, value: str | None) -> Result:
    request, _model, digest = button_value(inv, value)
    return decide(inv, request, True, card_digest=digest, notice=False)


def on_reject(inv: Invocation, value: str | None) -> Result:
    request, model, digest = button_value(inv, value)
    req = inv.core.promotions.get(request)
    if req["state"] != "open":
        raise Refused(f"promotion request #{request} is already {req['state']}", "nothing left to decide")
    return RejectForm({"r": request, "m": model, "d": digest}, inv.channel, inv.message_ts, home=inv.home)


def on_retry(inv: Invocation, value: str | None) -> Result:
    request, _model, _digest = button_value(inv, value)
    return RequestChanged(inv.core.promotions.retry(request, inv.user))


def form_metadata(form: RejectForm) -> str:
    """The reject form's private metadata: the button's value plus the card it came from (or the Home tab)."""
    home = {"h": 1} if form.home else {}
    return json.dumps({**form.value, "c": form.channel, "t": form.message_ts, **home}, separators=(",", ":"))


def form_home(metadata: str) -> bool:
    """Whether a reject form was opened from the Home tab."""
    try:
        return bool(json.loads(metadata).get("h"))
    except (ValueError, AttributeError):
        return False


def form_card(metadata: str) -> tuple[str | None, str | None]:
    """(channel, message ts) of the card a reject form belongs to; (None, None) when unreadable."""
    try:
        meta = json.loads(metadata)
        return meta.get("c"), meta.get("t")
    except (ValueError, AttributeError):
        return None, None


def on_reject_reason(inv: Invocation, metadata: str, reason: str) -> Result:
    try:
        meta = json.loads(metadata)
        request, digest = int(meta["r"]), str(meta["d"])
    except (ValueError, TypeError, KeyError):
        inv.core.audit.record_refusal(inv.user, "malformed_value", f"modal metadata {metadata[:200]!r}")
        raise InvalidInput("the rejection form was malformed", "click Reject on the card again") from None
    inv.channel, inv.message_ts = meta.get("c") or inv.channel, meta.get("t")
    return decide(inv, request, False, reason=reason, card_digest=digest, notice=False)
