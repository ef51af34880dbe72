"""/ml audit [MODEL] [filters] [--csv], /ml audit verify, and the Next button."""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import Any

from handlers.context import Ctx, Deps
from model_registry.errors import InvalidInput
from model_registry.names import parse_time

PAGE = 20


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.target, "since": args.since, "until": args.until, "actor": args.actor,
            "action": args.action, "version": args.version}


def _parsed(filters: dict[str, Any]) -> dict[str, Any]:
    return {"model": filters.get("model"), "since": parse_time(filters["since"]) if filters.get("since") else None,
            "until": parse_time(filters["until"]) if filters.get("until") else None, "actor": filters.get("actor"),
            "action": filters.get("action"), "version": filters.get("version")}


def _query(deps: Deps, filters: dict[str, Any], limit: int, before_seq: int | None = None) -> list[dict[str, Any]]:
    return deps.registry.audit.events(limit=limit, before_seq=before_seq, **_parsed(filters))


def audit(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    if args.target == "checkpoint":
        cp = deps.registry.audit.checkpoint()
        channel = deps.registry.config.audit_checkpoint.get("channel") or ctx.channel
        text = (f"Audit checkpoint: {cp['count']} events, head `{cp['head']}` at {cp['at']}"
                + (f", signature `{cp['sig']}`" if cp["sig"] else " (unsigned)"))
        ctx.client.chat_postMessage(channel=channel, text=text, blocks=[deps.render.section(text)])
        ctx.ephemeral(f"Checkpoint posted to <#{channel}>.")
        return
    if args.target == "verify":
        result = deps.registry.audit.verify()
        text = (f":white_check_mark: Audit chain OK: {result.events} events, head `{result.head_hash[:16]}`, "
                f"{result.checkpoints} checkpoints matched"
                if result.ok else f":rotating_light: Audit chain BROKEN: {result.problem}")
        ctx.ephemeral(text, [deps.render.section(text)])
        return
    if args.at:
        if not args.target:
            raise InvalidInput("audit --at needs a model", "e.g. /ml audit iris --at 2026-11-01T09:00")
        answer = deps.registry.audit.default_at(args.target, parse_time(args.at))
        text, blocks = deps.render.default_at_message(answer)
        _answer(ctx, text, blocks, args.share)
        return
    filters = _filters(args)
    if args.csv:
        events = list(deps.registry.audit.all_events(**_parsed(filters)))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["seq", "at", "action", "actor", "actor_name", "model", "version", "request_id", "job_id",
                         "channel", "message_ts", "details"])
        for e in events:
            writer.writerow([e["seq"], e["at"], e["action"], e["actor"], e["actor_name"], e["model"], e["version"],
                             e["request_id"], e["job_id"], e["channel"], e["message_ts"],
                             json.dumps(e["details"], sort_keys=True)])
        ctx.client.files_upload_v2(channel=ctx.channel, content=buf.getvalue(), filename="audit.csv",
                                   title=f"Audit events ({len(events)})")
        ctx.ephemeral(f"Uploaded {len(events)} audit events as audit.csv.")
        return
    show_page(deps, ctx, filters, min(args.limit, PAGE), share=args.share)


def _answer(ctx: Ctx, text: str, blocks: list[dict[str, Any]], share: bool) -> None:
    if share:
        ctx.client.chat_postMessage(channel=ctx.channel, text=text, blocks=blocks)
    else:
        ctx.ephemeral(text, blocks)


def show_page(deps: Deps, ctx: Ctx, filters: dict[str, Any], limit: int, before_seq: int | None = None,
              share: bool = False) -> None:
    events = _query(deps, filters, limit + 1, before_seq)
    more = len(events) > limit
    events = events[:limit]
    next_value = {"f": filters, "l": limit, "b": events[-1]["seq"]} if more and events else None
    title = "Audit events" + (f" of {filters['model']}" if filters.get("model") else "")
    text, blocks = deps.render.audit_table(events, title, next_value)
    _answer(ctx, text, blocks, share)


def on_next(deps: Deps, ctx: Ctx, value: str | None) -> None:
    try:
        data = json.loads(value or "")
        filters, limit, before = dict(data["f"]), int(data["l"]), int(data["b"])
    except (ValueError, TypeError, KeyError):
        raise InvalidInput("that Next button is malformed", "run the /ml audit command again") from None
    show_page(deps, ctx, filters, limit, before)
