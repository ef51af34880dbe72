"""schedule list | schedule MODEL "CRON" [-- ARGS] | schedule MODEL off."""

from __future__ import annotations

import argparse

from handlers.grammar import Usage
from handlers.results import Result, ScheduleChanged, Schedules
from handlers.table import Invocation


def schedule_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("target", nargs="?", metavar="list|MODEL")
    p.add_argument("cron", nargs="?", metavar='"CRON"|off')
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron (default UTC)")


def schedule(inv: Invocation) -> Result:
    args, core = inv.args, inv.core
    if args.target in (None, "list"):
        return Schedules(core.schedules.all())
    if args.cron is None:
        raise Usage('a schedule needs a cron or `off`: schedule MODEL "CRON" [-- ARGS] | schedule MODEL off | '
                    'schedule list (e.g. schedule iris "0 3 * * *" -- --epochs=20)')
    if args.cron == "off":
        return ScheduleChanged(core.schedules.disable(args.target, inv.user))
    return ScheduleChanged(core.schedules.set(args.target, args.cron, inv.user, inv.trainer_args, args.timezone))
