"""audit [MODEL] [filters] [--csv], audit verify, audit checkpoint, audit MODEL --at T, and the Next button."""

from __future__ import annotations

import argparse
import json
from typing import Any

from handlers.grammar import Usage
from handlers.results import AuditExport, AuditPage, AuditVerified, Checkpoint, DefaultAt, Result
from handlers.table import Invocation, Surface
from model_registry.domain.errors import InvalidInput
from model_registry.domain.names import parse_time

PAGE = 20  # rows a chat message shows before its Next button
AUDIT_NEXT = "audit.next"


def audit_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    p.add_argument("target", nargs="?", metavar="MODEL|verify|checkpoint")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--actor", "--by", *([] if cli else ["--user"]), dest="actor", help="only events by this user")
    p.add_argument("--action")
    p.add_argument("--version")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--csv", action="store_true")
    p.add_argument("--at", help="which version was the default of MODEL at this time")
    if not cli:
        p.add_argument("--share", action="store_true", help="post the answer to the channel")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.target, "since": args.since, "until": args.until, "actor": args.actor,
            "action": args.action, "version": args.version}


def _parsed(filters: dict[str, Any]) -> dict[str, Any]:
    return {"model": filters.get("model"), "since": parse_time(filters["since"]) if filters.get("since") else None,
            "until": parse_time(filters["until"]) if filters.get("until") else None, "actor": filters.get("actor"),
            "action": filters.get("action"), "version": filters.get("version")}


def audit(inv: Invocation) -> Result:
    args, core = inv.args, inv.core
    share = bool(getattr(args, "share", False))
    if args.target == "checkpoint":
        channel = core.config.audit_checkpoint.get("channel")
        if not inv.outbox:  # the surface shows it (the console), or nobody does (the CLI)
            return Checkpoint(core.audit.checkpoint(), channel)
        channel = channel or inv.channel
        if not channel:
            raise InvalidInput("this answer needs a channel", "type the command in a channel")
        return Checkpoint(core.audit.checkpoint(channel, user=inv.user), channel)
    if args.target == "verify":
        return AuditVerified(core.audit.verify())
    if args.at:
        if not args.target:
            raise Usage("audit --at: a model is required (audit MODEL --at TIME)")
        return DefaultAt(core.audit.default_at(args.target, parse_time(args.at)), share=share)
    filters = _filters(args)
    if args.csv:  # --csv exports everything that matches; a page shows --limit rows
        return AuditExport(list(core.audit.all_events(**_parsed(filters))))
    if inv.surface is Surface.CLI:
        return AuditPage(core.audit.events(limit=args.limit, **_parsed(filters)), model=args.target)
    return page(inv, filters, min(args.limit, PAGE), share=share)


def page(inv: Invocation, filters: dict[str, Any], limit: int, before_seq: int | None = None,
         share: bool = False) -> AuditPage:
    """One page for chat; one more row is read to know whether a Next button is due."""
    events = inv.core.audit.events(limit=limit + 1, before_seq=before_seq, **_parsed(filters))
    more, events = len(events) > limit, events[:limit]
    next_value = {"f": filters, "l": limit, "b": events[-1]["seq"]} if more and events else None
    return AuditPage(events, model=filters.get("model"), next=next_value, share=share)


def on_next(inv: Invocation, value: str | None) -> Result:
    try:
        data = json.loads(value or "")
        filters, limit, before = dict(data["f"]), int(data["l"]), int(data["b"])
    except (ValueError, TypeError, KeyError):
        raise InvalidInput("that Next button is malformed", "run the /ml audit command again") from None
    return page(inv, filters, limit, before)
