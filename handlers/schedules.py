"""/ml schedule list | /ml schedule MODEL "CRON" [-- ARGS] | /ml schedule MODEL off."""

from __future__ import annotations

import argparse

from handlers.context import Ctx, Deps
from model_registry.errors import InvalidInput


def schedule(deps: Deps, ctx: Ctx, args: argparse.Namespace, trainer_args: list[str] | None = None) -> None:
    reg = deps.registry
    if args.target in (None, "list"):
        text, blocks, _ = deps.render.table("Schedules", reg.schedules.all(), [
            ("model", "MODEL"), ("cron", "CRON"), ("timezone", "TZ"), ("enabled", "ON"), ("next_run_at", "NEXT"),
            ("args", "ARGS")])
        ctx.ephemeral(text, blocks)
        return
    if args.cron is None:
        raise InvalidInput("a schedule needs a cron or `off`", 'e.g. /ml schedule iris "0 3 * * *" -- --epochs=20')
    if args.cron == "off":
        row = reg.schedules.disable(args.target, ctx.user)
        ctx.ephemeral(f"The schedule of {row['model']} is off.")
        return
    row = reg.schedules.set(args.target, args.cron, ctx.user, trainer_args, args.timezone)
    ctx.ephemeral(f"{row['model']} trains at `{row['cron']}` ({row['timezone']}); next run {row['next_run_at']}.")
