"""Promotion requests: promote, apply, rollback, approve, reject, show, requests; the card's buttons and form."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from handlers.grammar import model_arg, model_of, request_id
from handlers.results import (
    Compared,
    Decided,
    RejectForm,
    RequestChanged,
    RequestOpened,
    Requests,
    RequestShown,
    Result,
    TryForm,
)
from handlers.table import Invocation
from model_registry.domain import instances
from model_registry.domain.errors import InvalidInput, Refused
from model_registry.domain.promotion import model_mismatch

if TYPE_CHECKING:  # the views' module loads SQLAlchemy, which the web process loads only with the core
    from model_registry.services.views import RequestView

APPROVE, REJECT, RETRY, TRY = "review.approve", "review.reject", "review.retry", "review.try"


# ---------------------------------------------------------------- commands

def promote_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--reason")
    p.add_argument("--canary", nargs="?", const="", metavar="PCT",
                   help="once approved, send PCT%% of the default's traffic to the version first (alone: the "
                        "model's canary.percent)")
    p.add_argument("--bake", metavar="DURATION", help="how long the canary runs before it is promoted or waits, "
                                                      "e.g. 30m (default: the model's canary.bake)")


def reason_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    model_arg(p)
    p.add_argument("--reason")


def _card(inv: Invocation) -> dict[str, Any]:
    """Through the outbox, the review card is recorded with the request (for the model's channel, else this one)."""
    return {"channel": inv.channel, "card": True} if inv.outbox else {}


def promote(inv: Invocation) -> Result:
    args = inv.args
    return RequestOpened(inv.core.promotions.promote(args.model, args.version, inv.user, args.reason,
                                                     canary=args.canary, bake=args.bake, **_card(inv)))


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
           card_digest: str | None = None, model: str | None = None, notice: bool = True) -> Decided:
    """One decision, then (if it completed the approvals) the application: for every surface, written once."""
    promotions = inv.core.promotions
    req = promotions.decide(request, inv.user, approve, reason=reason, card_digest=card_digest, model=model,
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


def button_request(inv: Invocation, raw: str | None) -> tuple[RequestView, str]:
    """The request a button names, read once, and the card digest it carries; a malformed value, or one naming
    another model than the request's, is refused and recorded."""
    request, model, digest = parsed_button(inv, raw)
    req = inv.core.promotions.get(request)
    if req["model"] != model:
        refusal, recorded = model_mismatch(model, request, req["model"])
        inv.core.audit.record_refusal(inv.user, "model_mismatch", recorded, model=req["model"], request_id=request,
                                      channel=inv.channel, message_ts=inv.message_ts)
        raise refusal
    return req, digest


def parsed_button(inv: Invocation, raw: str | None) -> tuple[int, str, str]:
    """A button's (request id, model, card digest), its model not yet checked against the request's."""
    try:
        value = json.loads(raw or "")
        return int(value["r"]), str(value["m"]), str(value["d"])
    except (ValueError, TypeError, KeyError) as exc:
        inv.core.audit.record_refusal(inv.user, "malformed_value", f"button value {str(raw)[:200]!r}: {exc}",
                                      channel=inv.channel, message_ts=inv.message_ts)
        raise InvalidInput("that button's value is malformed", "use the buttons of a card the bot posted") from None


def on_approve(inv: Invocation, value: str | None) -> Result:
    # the decision's own transaction checks the button's model against the request's (no read of its own)
    request, model, digest = parsed_button(inv, value)
    return decide(inv, request, True, card_digest=digest, model=model, notice=False)


def on_reject(inv: Invocation, value: str | None) -> Result:
    req, digest = button_request(inv, value)
    if req["state"] != "open":
        raise Refused(f"promotion request #{req['id']} is already {req['state']}", "nothing left to decide")
    return RejectForm({"r": req["id"], "m": req["model"], "d": digest}, inv.channel, inv.message_ts, home=inv.home)


def on_retry(inv: Invocation, value: str | None) -> Result:
    req, _digest = button_request(inv, value)
    return RequestChanged(inv.core.promotions.retry(req["id"], inv.user))


def form_metadata(form: RejectForm) -> str:
    """The reject form's private metadata: the button's value plus the card it came from (or the Home tab)."""
    home = {"h": 1} if form.home else {}
    return json.dumps({**form.value, "c": form.channel, "t": form.message_ts, **home}, separators=(",", ":"))


def form_value(inv: Invocation, metadata: str, form: str, button: str) -> dict[str, Any]:
    """A form's private metadata, read; the card it came from becomes where the answer goes. Malformed (forged or
    truncated) metadata is refused and recorded."""
    try:
        meta = json.loads(metadata)
        value = {"r": int(meta["r"]), "m": str(meta["m"]), "d": str(meta["d"]), "v": str(meta.get("v") or "")}
    except (ValueError, TypeError, KeyError, AttributeError):
        inv.core.audit.record_refusal(inv.user, "malformed_value", f"modal metadata {metadata[:200]!r}")
        raise InvalidInput(f"the {form} form was malformed", f"click {button} on the card again") from None
    inv.channel, inv.message_ts = meta.get("c") or inv.channel, meta.get("t")
    return value


def on_reject_reason(inv: Invocation, metadata: str, reason: str) -> Result:
    value = form_value(inv, metadata, "rejection", "Reject")
    return decide(inv, value["r"], False, reason=reason, card_digest=value["d"], notice=False)


# ---------------------------------------------------------------- the card's Try

def on_try(inv: Invocation, value: str | None) -> Result:
    """Try: a form with one field per input of the candidate's signature, filled with an example instance."""
    req, digest = button_request(inv, value)
    request, model, candidate = req["id"], req["model"], req["candidate"]
    specs = inv.core.predictions.inputs(model, candidate)
    example = inv.core.predictions.example(model, candidate)
    fields = tuple((name, str(specs[name].get("dtype")), specs[name].get("shape"), example[name])
                   for name in sorted(example))
    return TryForm({"r": request, "m": model, "v": candidate, "d": digest}, fields, inv.channel, inv.message_ts)


def try_metadata(form: TryForm) -> str:
    """The Try form's private metadata: the request and candidate, each field's dtype and shape, and the card."""
    return json.dumps({**form.value, "f": [[name, dtype, shape] for name, dtype, shape, _ in form.fields],
                       "c": form.channel, "t": form.message_ts}, separators=(",", ":"))


def try_instance(metadata: str, texts: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The instance typed into a Try form, and the refusals by field (input name -> what is wrong).

    A scalar input is typed as it is (a number, true/false, or text); an input with more dimensions as JSON.
    Each value is checked against its input's dtype and shape as a prediction would be.
    """
    try:
        fields = [(str(n), str(d), sh) for n, d, sh in json.loads(metadata)["f"]]
    except (ValueError, TypeError, KeyError):
        raise InvalidInput("the Try form was malformed", "click Try on the card again") from None
    instance: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, dtype, shape in fields:
        raw = texts.get(name) or ""
        dims = list(shape)[1:] if isinstance(shape, list) else None
        try:
            value = _typed(raw, instances.dtype_name(dtype), dims)
            instances.check_tensor(value, instances.dtype_name(dtype), dims, name,
                                   shown=shape if isinstance(shape, list) else None)
        except (ValueError, instances.InstancesRefused) as exc:
            errors[name] = (exc.message if isinstance(exc, instances.InstancesRefused) else str(exc))[:150]
            continue
        instance[name] = value
    return instance, errors


def _typed(raw: str, dtype: str, dims: list[Any] | None) -> Any:
    text = raw.strip()
    if dims is None or dims:  # not a scalar: JSON, as in a prediction request
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"give a JSON list for this input's shape, e.g. {json.dumps([0] * 2)}") from None
    if dtype == "string":
        return raw
    if dtype == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError("type true or false")
        return text.lower() == "true"
    try:
        return int(text) if dtype.startswith(("int", "uint")) else float(text)
    except ValueError:
        kind = "a whole number" if dtype.startswith(("int", "uint")) else "a number"
        raise ValueError(f"type {kind} ({dtype}), not {text[:40]!r}") from None


def on_try_submit(inv: Invocation, metadata: str, instance: dict[str, Any]) -> Result:
    """The candidate and the default answering the instance from a Try form, side by side."""
    value = form_value(inv, metadata, "Try", "Try")
    if not value["v"]:
        raise InvalidInput("the Try form names no version", "click Try on the card again")
    return Compared(inv.core.predictions.compare(value["m"], [instance], value["v"]))
