"""Canaries: `canary MODEL [status|promote|rollback]`, and the canary card's buttons."""

from __future__ import annotations

import argparse
import json

from handlers.grammar import model_arg, model_of
from handlers.results import CanaryChanged, CanaryShown, Result
from handlers.table import Invocation
from model_registry.domain.errors import InvalidInput

PROMOTE, ROLLBACK = "canary.promote", "canary.rollback"
WHAT = ("status", "promote", "rollback")


def canary_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    model_arg(p)
    p.add_argument("what", nargs="?", default="status", choices=WHAT, metavar="status|promote|rollback")
    p.add_argument("--reason")


def canary(inv: Invocation) -> Result:
    model, what = model_of(inv.args), inv.args.what
    canaries = inv.core.canaries
    if what == "promote":
        return CanaryChanged(canaries.promote(model, inv.user))
    if what == "rollback":
        return CanaryChanged(canaries.rollback(model, inv.user, reason=inv.args.reason))
    return CanaryShown(canaries.status(model))


def card_value(view: dict[str, object]) -> dict[str, object]:
    """What the canary card's buttons carry: the request and its model."""
    return {"r": view["request_id"], "m": view["model"]}


def _value(inv: Invocation, raw: str | None) -> tuple[int, str]:
    try:
        value = json.loads(raw or "")
        return int(value["r"]), str(value["m"])
    except (ValueError, TypeError, KeyError) as exc:
        inv.core.audit.record_refusal(inv.user, "malformed_value", f"canary button value {str(raw)[:200]!r}: {exc}",
                                      channel=inv.channel, message_ts=inv.message_ts)
        raise InvalidInput("that button's value is malformed", "use the buttons of a card the bot posted") from None


def on_promote(inv: Invocation, raw: str | None) -> Result:
    request, model = _value(inv, raw)
    return CanaryChanged(inv.core.canaries.promote(model, inv.user, request_id=request, channel=inv.channel,
                                                   message_ts=inv.message_ts), notice=False)


def on_rollback(inv: Invocation, raw: str | None) -> Result:
    request, model = _value(inv, raw)
    return CanaryChanged(inv.core.canaries.rollback(model, inv.user, request_id=request, channel=inv.channel,
                                                    message_ts=inv.message_ts), notice=False)
